"""svftune command line: inspect, merge, diff and draw singular-value checkpoints.

Commands:
  inspect CHECKPOINT                  layers, counts, size, base fingerprints
  merge BASE CHECKPOINT OUT           base weights + checkpoint -> plain merged weights file
  diff CHECKPOINT [OTHER] [--png F]   largest singular-value changes per layer (table or bar chart)
  plot-changes CHECKPOINT --out F     one layer's largest changes as a picture (SVF paper Figure 6)
  plot-activations CHECKPOINT --model M ...   activation maps of the directions that grew / shrank most (Fig. 4-5)

CHECKPOINT is a .safetensors file, a checkpoint directory or a Hub repo id (--revision). Nothing here unpickles
a checkpoint; a .pt/.pth base weights file for merge is read with torch.load(weights_only=True), which only
accepts tensors and plain containers. Errors are one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import math
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from . import __version__, plots
from ._io import atomic_write, read_safetensors, safetensors_bytes
from .checkpoint import SVFCheckpoint, SVFCheckpointError, load_svf, read_svf
from .checkpoint.format import KINDS_REGISTRY
from .model import merge_svf, svf_layers

_SUMMARY_LAYERS = 60


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``svftune`` command; returns the exit status (2 for any error, with one line on stderr)."""
    parser = _parser()
    args = None
    try:
        args = parser.parse_args(argv)
        return args.run(args)
    except BrokenPipeError:  # e.g. svftune inspect f | head: the reader is gone; exit quietly
        _silence_stdout()
        return 0
    except KeyboardInterrupt:
        print("svftune: interrupted", file=sys.stderr)
        return 130
    except (SVFCheckpointError, plots.PlotError, ImportError, OSError, ValueError, TypeError) as err:
        prefix = f"svftune {args.command}" if args is not None else "svftune"
        print(f"{prefix}: error: {' '.join(str(err).split())}", file=sys.stderr)  # one line, whatever the message
        return 2


def _silence_stdout() -> None:
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (exit status 2) instead of the usage block."""

    def error(self, message: str) -> None:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="svftune", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"svftune {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)

    inspect = commands.add_parser("inspect", help="show a checkpoint's layers, counts, size and base fingerprint")
    inspect.description = (
        "Show a checkpoint's format, configuration, layers, trainable counts, size and base fingerprints."
    )
    inspect.add_argument("checkpoint", help="a .safetensors file, a checkpoint directory or a Hub repo id")
    inspect.add_argument("--revision", help="Hub branch, tag or commit")
    inspect.add_argument("--all", action="store_true", help=f"list every layer (default: the first {_SUMMARY_LAYERS})")
    inspect.set_defaults(run=_inspect)

    merge = commands.add_parser("merge", help="base weights + checkpoint -> plain merged weights file")
    merge.description = (
        "Write the base model's weights with the checkpoint merged in (W + U diag(S - S0) Vh, rebuilt in float64), "
        "as a plain state dict that loads without svftune. The base must be the one the checkpoint was trained on."
    )
    merge.add_argument("base", help="base state dict: .safetensors, or .pt/.pth/.bin (read with weights_only=True)")
    merge.add_argument("checkpoint", help="a .safetensors file, a checkpoint directory or a Hub repo id")
    merge.add_argument("output", help="merged state dict to write (.safetensors)")
    merge.add_argument("--prefix", default="", help="prefix of the layer names in the base file, e.g. 'backbone.'")
    merge.add_argument("--no-strict", dest="strict", action="store_false", help="merge only the layers that match")
    merge.add_argument("--revision", help="Hub branch, tag or commit")
    merge.set_defaults(run=_merge)

    diff = commands.add_parser("diff", help="largest singular-value changes per layer (table or PNG bar chart)")
    diff.description = (
        "Per layer, the largest changes of the singular values (S - S0) in a checkpoint, or between two "
        "checkpoints of the same base; as a table, or with --png as a bar chart per layer (like Figure 6 of the "
        "SVF paper)."
    )
    diff.add_argument("checkpoint", help="a .safetensors file, a checkpoint directory or a Hub repo id")
    diff.add_argument("other", nargs="?", help="a second checkpoint of the same base: show the difference")
    diff.add_argument("--top", type=int, default=3, help="largest changes listed per layer (default 3)")
    diff.add_argument("--png", help="write a bar chart of the changes to this PNG file (needs matplotlib)")
    diff.add_argument("--layers", nargs="+", help="layers to chart (default: the 6 with the largest change)")
    diff.add_argument("--revision", help="Hub branch, tag or commit")
    diff.set_defaults(run=_diff)

    changes = commands.add_parser("plot-changes", help="one layer's largest singular-value changes as a PNG (Fig. 6)")
    changes.description = (
        "Draw one layer's singular-value changes S - S0 (like Figure 6 of the SVF paper): all changes sorted, and "
        "bars of the largest increases and decreases. A checkpoint holds only the changes; with --base (the base "
        "weights it was trained on) the pretrained values S0 are recomputed, so the bars show S0 -> S and "
        "--by relative ranks by (S - S0) / S0. Needs matplotlib."
    )
    changes.add_argument("checkpoint", help="a .safetensors file, a checkpoint directory or a Hub repo id")
    changes.add_argument("--layer", help="the layer to draw (default: the one with the largest change)")
    changes.add_argument("--out", required=True, help="PNG file to write")
    changes.add_argument("--top", type=int, default=8, help="increases and decreases drawn as bars (default 8)")
    changes.add_argument("--base", help="base state dict (.safetensors / .pt): adds S0, S and relative changes")
    changes.add_argument("--prefix", default="", help="prefix of the layer names in the base file")
    changes.add_argument("--by", choices=plots.RANKINGS, default="absolute", help="rank by S - S0 or relative")
    changes.add_argument("--revision", help="Hub branch, tag or commit")
    changes.set_defaults(run=_plot_changes)

    acts = commands.add_parser("plot-activations", help="activation maps of singular directions for an image")
    acts.description = (
        "Draw, for one image, the activation maps |S_r v_r^T x| of the singular directions of one SVF layer whose "
        "values grew and shrank most (Figures 4-5 of the SVF paper; the definition is in the svftune.plots "
        "docs). The model is built by calling FACTORY(**kwargs) from MODULE (e.g. torchvision.models:mobilenet_v2), "
        "loaded with --weights, and the checkpoint is applied with svftune.load_svf. The image is resized to "
        "--size x --size and normalised with the ImageNet mean and std. Needs matplotlib (and pillow)."
    )
    acts.add_argument("checkpoint", nargs="?", help="the singular-value checkpoint trained on that base")
    acts.add_argument(
        "--model",
        required=True,
        metavar="MODULE:FACTORY",
        help="e.g. torchvision.models:resnet50, or with keyword arguments: torchvision.models:resnet18(num_classes=10)",
    )
    acts.add_argument(
        "--model-kwargs",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="keyword arguments for FACTORY; VALUE is a Python literal (10, 0.5, None, 'x') or else a plain string",
    )
    acts.add_argument("--weights", help="state dict of the base model (.safetensors / .pt), loaded strictly")
    acts.add_argument("--checkpoint", dest="checkpoint_option", help=argparse.SUPPRESS)  # deprecated spelling
    acts.add_argument("--layer", required=True, help="the SVF layer's name in the model")
    acts.add_argument("--image", required=True, help="an image file (PNG, JPEG, ...)")
    acts.add_argument("--out", required=True, help="PNG file to write")
    acts.add_argument("--size", type=int, default=224, help="side the image is resized to (default 224)")
    acts.add_argument("--top", type=int, default=3, help="directions that grew and that shrank (default 3 each)")
    acts.add_argument("--by", choices=plots.RANKINGS, default="absolute", help="rank by S - S0 or relative")
    acts.add_argument("--no-normalize", dest="normalize", action="store_false", help="feed pixels in [0, 1]")
    acts.add_argument("--revision", help="Hub branch, tag or commit")
    acts.set_defaults(run=_plot_activations)
    return parser


# ------------------------------------------------------------------------------------------------ inspect
def _inspect(args: argparse.Namespace) -> int:
    checkpoint = read_svf(args.checkpoint, revision=args.revision)
    meta, config = checkpoint.metadata, checkpoint.config
    print(f"checkpoint:   {checkpoint.source}")
    print(f"format:       {meta['format_version']} (svftune {meta.get('svftune_version', 'unknown')})")
    print(f"size:         {checkpoint.size_bytes:,d} bytes")
    print(f"config:       train={config['train']} form={config['form']} freeze_bn={config['freeze_bn']}")
    print(f"layers:       {len(checkpoint.layers)}")
    print(f"values:       {checkpoint.count:,d} singular values")
    stored = {t.dtype for t in checkpoint.deltas.values()}
    print(f"stored as:    {', '.join(str(d).replace('torch.', '') for d in stored)}")
    basis = sum(1 for e in checkpoint.layers.values() for t in e.ties if t[3] == "basis")
    equal = sum(1 for e in checkpoint.layers.values() for t in e.ties if t[3] == "equal")
    print(f"tied runs:    {basis} with stored bases, {equal} with equal changes (basis-free)")
    if checkpoint.extra:
        extra = ", ".join(f"{k} ({'x'.join(map(str, v.shape))})" for k, v in checkpoint.extra.items())
        print(f"also trained: {extra}")
    user = meta.get("user") or {}
    for key in ("base_model", "metrics"):
        if key in user:
            print(f"{key + ':':13} {user[key]}")
    rows = [("layer", "kind", "weight", "groups", "rank", "max |dS|", "ties", "base sha256")]
    entries = list(checkpoint.layers.values())
    shown = entries if args.all else entries[:_SUMMARY_LAYERS]
    for entry in shown:
        delta = checkpoint.deltas[entry.name].abs().max()
        ties = ",".join(f"{t[2] - t[1]}{'b' if t[3] == 'basis' else 'e'}" for t in entry.ties) or "-"
        ties = ties if len(ties) <= 16 else f"{len(entry.ties)} runs"
        weight = f"{'x'.join(map(str, entry.shape))} {entry.dtype}"
        rows.append(
            (
                entry.name,
                entry.kind,
                weight,
                str(entry.groups),
                str(entry.rank),
                f"{float(delta):.4g}",
                ties,
                entry.sha256[:16],
            )
        )
    print()
    _table(rows)
    if len(shown) < len(entries):
        print(f"... and {len(entries) - len(shown)} more layers (--all lists them)")
    return 0


def _table(rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())


# ------------------------------------------------------------------------------------------------ merge
def _merge(args: argparse.Namespace) -> int:
    checkpoint = read_svf(args.checkpoint, revision=args.revision)
    state = read_state_dict(Path(args.base))
    merged = merge_state_dict(state, checkpoint, prefix=args.prefix, strict=args.strict)
    output = Path(args.output)
    if output.suffix != ".safetensors":
        raise SVFCheckpointError(
            f"the merged weights are written as safetensors: name the output *.safetensors, not {output}"
        )
    atomic_write(output, safetensors_bytes(merged))
    changed = len(checkpoint.layers) + len(checkpoint.extra)
    print(f"wrote {output}: {len(merged)} tensors, {changed} of them changed by {checkpoint.source}")
    return 0


def read_state_dict(path: Path) -> dict[str, Tensor]:
    """A flat state dict from a .safetensors file, or a .pt/.pth/.bin file read with ``weights_only=True``."""
    if path.suffix == ".safetensors":
        return read_safetensors(path, f"base weights {path}")[1]
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise SVFCheckpointError(f"cannot read base weights {path} as a state dict: {err}") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise SVFCheckpointError(f"{path} does not hold a state dict (a mapping of names to tensors)")
    return state


def merge_state_dict(
    state: dict[str, Tensor], checkpoint: SVFCheckpoint, *, prefix: str = "", strict: bool = True
) -> dict[str, Tensor]:
    """``state`` with the checkpoint merged into its adapted layers (and its other trained tensors replaced).

    The adapted layers are rebuilt as plain modules around the state dict's tensors, so the base checks of
    ``svftune.load_svf`` apply: another base raises ``SVFCheckpointError``.
    """
    root = base_model(state, checkpoint, prefix=prefix, strict=strict)
    merge_svf(root)
    merged = dict(state)
    for name, tensor in root.state_dict().items():
        merged[f"{prefix}{name}"] = tensor.detach()
    return merged


def base_model(
    state: dict[str, Tensor], checkpoint: SVFCheckpoint, *, prefix: str = "", strict: bool = True
) -> nn.Module:
    """A module holding just the checkpoint's layers, built around the base weights, with the checkpoint loaded.

    Its SVF layers know ``S0`` (re-decomposed from ``state``) and ``S``; another base raises
    ``SVFCheckpointError``, as ``svftune.load_svf`` does.
    """
    root = nn.Module()
    for name, entry in checkpoint.layers.items():
        key = f"{prefix}{name}.weight"
        if key not in state:
            if strict:
                raise SVFCheckpointError(f"the base weights have no {key!r} for layer {name}; check --prefix")
            continue
        _put(root, name, _layer_around(entry.kind, state[key], entry.groups, state.get(f"{prefix}{name}.bias")))
    for pname in checkpoint.extra:
        if f"{prefix}{pname}" in state:
            module_name, _, attr = pname.rpartition(".")
            holder = _module_at(root, module_name)
            if attr not in holder._parameters:
                holder.register_parameter(attr, nn.Parameter(state[f"{prefix}{pname}"].clone(), requires_grad=False))
    load_svf(root, checkpoint, strict=strict)
    return root


def _layer_around(kind: str, weight: Tensor, groups: int, bias: Tensor | None) -> nn.Module:
    """A plain layer of ``kind`` that holds ``weight`` (and ``bias``) itself."""
    registered = KINDS_REGISTRY[kind]  # resolved now: transformers may have been imported after svftune
    layer_type = registered.plain_class()
    if layer_type is None:
        raise SVFCheckpointError(f"the checkpoint has {kind} layers, whose library is not installed (transformers?)")
    with torch.device("meta"):
        if registered.transposed:  # transformers' Conv1D(nf=out, nx=in) holds its weight as (in, out)
            layer = layer_type(weight.shape[1], weight.shape[0])
        elif layer_type is nn.Linear:
            layer = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        else:
            layer = layer_type(
                weight.shape[1] * groups, weight.shape[0], tuple(weight.shape[2:]), groups=groups, bias=False
            )
    layer.weight = nn.Parameter(weight.clone(), requires_grad=False)
    if bias is not None:
        layer.bias = nn.Parameter(bias.clone(), requires_grad=False)
    return layer


def _module_at(root: nn.Module, name: str) -> nn.Module:
    module = root
    for part in name.split(".") if name else []:
        if part not in module._modules:
            module.add_module(part, nn.Module())
        module = module._modules[part]
    return module


def _put(root: nn.Module, name: str, layer: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    _module_at(root, parent).add_module(child, layer)


# ------------------------------------------------------------------------------------------------ diff
def _diff(args: argparse.Namespace) -> int:
    checkpoint = read_svf(args.checkpoint, revision=args.revision)
    changes = {name: delta.to(torch.float64) for name, delta in checkpoint.deltas.items()}
    title = f"S - S0 in {checkpoint.source}"
    if args.other:
        other = read_svf(args.other, revision=args.revision)
        if list(other.layers) != list(checkpoint.layers) or any(
            other.layers[n].sha256 != e.sha256 for n, e in checkpoint.layers.items()
        ):
            raise SVFCheckpointError(
                f"{args.other} was not trained on the same base layers as {args.checkpoint}: they cannot be compared"
            )
        changes = {name: other.deltas[name].to(torch.float64) - delta for name, delta in changes.items()}
        title = f"singular values of {other.source} minus {checkpoint.source}"
    if args.top < 1:
        raise SVFCheckpointError("--top must be at least 1")
    rows = [("layer", "values", "mean |dS|", f"largest changes (group:index {'+/-'}value, top {args.top})")]
    for name, change in changes.items():
        flat = change.reshape(-1)
        top = flat.abs().topk(min(args.top, flat.numel())).indices.tolist()
        rank = change.shape[1]
        listed = "  ".join(f"{i // rank}:{i % rank} {float(flat[i]):+.4g}" for i in top)
        rows.append((name, str(flat.numel()), f"{float(flat.abs().mean()):.4g}", listed))
    print(title)
    _table(rows)
    if args.png:
        _plot(changes, args.layers, Path(args.png), title)
        print(f"wrote {args.png}")
    return 0


def _plot(changes: dict[str, Tensor], layers: list[str] | None, path: Path, title: str) -> None:
    Figure = plots._matplotlib().Figure  # the one place that imports matplotlib and says how to install it
    if layers:
        unknown = [name for name in layers if name not in changes]
        if unknown:
            raise SVFCheckpointError(f"--layers: no layer {', '.join(unknown)} in the checkpoint; see svftune inspect")
    else:
        layers = sorted(changes, key=lambda n: -float(changes[n].abs().max()))[:6]
        layers = [name for name in changes if name in layers]  # keep model order
    columns = min(3, len(layers))
    rows = math.ceil(len(layers) / columns)
    figure = Figure(figsize=(4.2 * columns, 2.8 * rows))  # no pyplot: no global state, no GUI backend
    axes = figure.subplots(rows, columns, squeeze=False)
    for axis in axes.flat[len(layers) :]:
        axis.set_visible(False)
    for axis, name in zip(axes.flat, layers, strict=False):
        values = changes[name].reshape(-1).numpy()
        colors = ["tab:blue" if v >= 0 else "tab:red" for v in values]
        axis.bar(range(len(values)), values, width=1.0, color=colors)
        axis.axhline(0, color="black", linewidth=0.5)
        axis.set_title(name, fontsize=9)
        axis.set_xlabel("singular value index", fontsize=8)
        axis.set_ylabel("change", fontsize=8)
        axis.tick_params(labelsize=7)
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    plots.to_png(figure, path, dpi=110)


# ------------------------------------------------------------------------------------------------ pictures
def _plot_changes(args: argparse.Namespace) -> int:
    checkpoint = read_svf(args.checkpoint, revision=args.revision)
    source: nn.Module | SVFCheckpoint = checkpoint
    if args.base:
        source = base_model(read_state_dict(Path(args.base)), checkpoint, prefix=args.prefix, strict=False)
        missing = [name for name in checkpoint.layers if name not in dict(svf_layers(source))]
        if args.layer in missing:
            raise SVFCheckpointError(f"the base weights have no {args.prefix}{args.layer}.weight; check --prefix")
    changes = plots.singular_value_changes(source, args.layer, by=args.by)
    name = args.layer or max(changes, key=lambda n: float(changes[n].delta.abs().max()))
    figure = plots.plot_singular_value_changes(
        changes[name], top=args.top, title=f"{name} ({Path(args.checkpoint).name})"
    )
    plots.to_png(figure, args.out)
    print(f"wrote {args.out}: {name}, {changes[name].total} singular values")
    return 0


_SPEC = re.compile(r"^(?P<module>[A-Za-z_][\w.]*):(?P<factory>[A-Za-z_]\w*)(?:\((?P<args>.*)\))?$", re.DOTALL)


def parse_model_spec(spec: str, kwargs: Sequence[str] = ()) -> tuple[str, str, dict]:
    """``"MODULE:FACTORY(k=v, ...)"`` plus ``["k=v", ...]`` -> ``(module, factory, kwargs)``.

    Values are read with ``ast.literal_eval`` (never evaluated as code); a ``--model-kwargs`` value that is not a
    literal is taken as a plain string.

    Raises:
        plots.PlotError: the spec or a keyword argument is malformed.
    """
    match = _SPEC.match(spec.strip())
    if not match:
        raise plots.PlotError(
            f"--model {spec!r}: give MODULE:FACTORY, e.g. torchvision.models:mobilenet_v2 or "
            "torchvision.models:resnet18(num_classes=10)"
        )
    arguments: dict = {}
    if match["args"] is not None and match["args"].strip():
        try:
            call = ast.parse(f"f({match['args']})", mode="eval").body
        except SyntaxError:
            raise plots.PlotError(f"--model {spec!r}: the arguments are not KEY=VALUE, ...") from None
        if not isinstance(call, ast.Call) or call.args or any(k.arg is None for k in call.keywords):
            raise plots.PlotError(f"--model {spec!r}: only keyword arguments KEY=VALUE are accepted")
        for keyword in call.keywords:
            try:
                arguments[keyword.arg] = ast.literal_eval(keyword.value)
            except ValueError:
                raise plots.PlotError(
                    f"--model {spec!r}: the value of {keyword.arg} is not a Python literal (number, string, None, "
                    "list...)"
                ) from None
    for item in kwargs:
        key, sep, text = item.partition("=")
        if not sep or not key.isidentifier():
            raise plots.PlotError(f"--model-kwargs {item!r}: give KEY=VALUE, e.g. num_classes=10")
        try:
            arguments[key] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            arguments[key] = text
    return match["module"], match["factory"], arguments


def build_model(spec: str, kwargs: Sequence[str] = ()) -> nn.Module:
    """``MODULE:FACTORY`` -> ``FACTORY(**kwargs)`` from the imported ``MODULE`` (e.g. ``torchvision.models:resnet50``).

    Keyword arguments come from ``MODULE:FACTORY(k=v)`` and from ``kwargs`` (``["k=v", ...]``), see
    ``parse_model_spec``.
    """
    module_name, factory_name, arguments = parse_model_spec(spec, kwargs)
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise plots.PlotError(f"--model {spec!r}: cannot import {module_name}: {err}") from None
    factory = getattr(module, factory_name, None)
    if not callable(factory):
        raise plots.PlotError(f"--model {spec!r}: {module_name} has no callable {factory_name}")
    try:
        model = factory(**arguments)
    except Exception as err:
        raise plots.PlotError(
            f"--model {spec!r}: {factory_name}(**{arguments}) failed: {type(err).__name__}: {err}"
        ) from None
    if not isinstance(model, nn.Module):
        raise plots.PlotError(f"--model {spec!r}: {factory_name}() returned a {type(model).__name__}, not a module")
    return model


def read_image(path: Path, size: int, normalize: bool = True) -> tuple[Tensor, Tensor]:
    """``(pixels in [0, 1], model input)``, both ``(3, size, size)``; the input ImageNet-normalised if asked."""
    if not path.is_file():
        raise plots.PlotError(f"--image {path}: no such file")
    try:
        from PIL import Image
    except ImportError:
        raise ImportError(
            "reading --image needs pillow: pip install 'svftune[plots]' (or pip install pillow)"
        ) from None
    try:
        with Image.open(path) as image:
            rgb = image.convert("RGB").resize((size, size), Image.BILINEAR)
    except Exception as err:
        raise plots.PlotError(f"--image {path}: cannot read it as an image: {err}") from None
    pixels = torch.frombuffer(bytearray(rgb.tobytes()), dtype=torch.uint8).reshape(size, size, 3)
    pixels = pixels.permute(2, 0, 1).float() / 255.0
    if not normalize:
        return pixels, pixels.clone()
    mean = torch.tensor([0.485, 0.456, 0.406]).reshape(3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).reshape(3, 1, 1)
    return pixels, (pixels - mean) / std


def _plot_activations(args: argparse.Namespace) -> int:
    if args.size < 1:
        raise plots.PlotError("--size must be at least 1")
    if args.checkpoint and args.checkpoint_option:
        raise plots.PlotError("give the checkpoint once: as the first argument (--checkpoint is its old spelling)")
    if args.checkpoint_option:
        print(
            "svftune plot-activations: --checkpoint is deprecated; give the checkpoint as the first argument",
            file=sys.stderr,
        )
    checkpoint = args.checkpoint or args.checkpoint_option
    if not checkpoint:
        raise plots.PlotError("give the checkpoint: svftune plot-activations CHECKPOINT --model ... (see --help)")
    pixels, inputs = read_image(Path(args.image), args.size, args.normalize)
    model = build_model(args.model, args.model_kwargs)
    if args.weights:
        state = read_state_dict(Path(args.weights))
        try:
            model.load_state_dict(state)
        except RuntimeError as err:
            first = str(err).strip().splitlines()[:3]
            raise plots.PlotError(f"--weights {args.weights} does not fit {args.model}: {' '.join(first)}") from None
    load_svf(model, read_svf(checkpoint, revision=args.revision))
    model.eval()
    parameter = next(model.parameters(), None)
    if parameter is not None:
        inputs = inputs.to(parameter.device, parameter.dtype)
    maps = plots.subspace_activations(model, args.layer, inputs[None], top=args.top, by=args.by)
    figure = plots.plot_subspace_activations(pixels, maps, title=f"{args.layer}: {Path(args.image).name}")
    plots.to_png(figure, args.out)
    print(f"wrote {args.out}: {len(maps.directions)} directions of {args.layer}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
