"""svftune.plots: singular-value changes and subspace activation maps against independent float64 references,
the chosen directions against brute-force top-k, figure layouts and error messages."""

from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import svftune
from svftune import plots


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class Net(nn.Module):
    """Odd shapes: a strided, dilated, rectangular-kernel conv; a grouped conv with reflect padding; a Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 5, (3, 2), stride=(2, 1), padding=(1, 2), dilation=(1, 2))
        self.act = nn.ReLU()
        self.grouped = nn.Conv2d(6, 9, 3, padding=1, groups=3, padding_mode="reflect", bias=False)
        self.lift = nn.Conv2d(5, 6, 1)
        self.head = nn.Linear(7, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.grouped(self.lift(self.act(self.conv(x))))
        return self.head(y.mean((2, 3))[:, :7])


def make_model(dtype=torch.float64, seed=0) -> nn.Module:
    torch.manual_seed(seed)
    model = Net().to(dtype)
    svftune.apply_svf(model, layers=["conv", "grouped", "head"])
    with torch.no_grad():
        for _, layer in svftune.svf_layers(model):
            layer.S.add_(0.2 * torch.randn_like(layer.S))  # distinct changes of both signs
    return model.eval()


# ------------------------------------------------------------------------------------------------ references
def reference_svd(weight: torch.Tensor, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Singular values and right singular vectors per group, float64, computed here independently."""
    matrices = weight.detach().double().reshape(groups, weight.shape[0] // groups, -1)
    _, s, vh = torch.linalg.svd(matrices, full_matrices=False)
    return s, vh


def reference_patches(x: torch.Tensor, conv: svftune.SVFConv2d) -> torch.Tensor:
    """(N, groups, fan_in, L) input patches with the conv's padding (mode), stride and dilation."""
    x = x.double()
    if conv.padding_mode != "zeros":
        ph, pw = conv.padding
        x = F.pad(x, (pw, pw, ph, ph), mode=conv.padding_mode)
        padding = 0
    else:
        padding = conv.padding
    cols = F.unfold(x, conv.kernel_size, dilation=conv.dilation, padding=padding, stride=conv.stride)
    n, _, length = cols.shape
    return cols.reshape(n, conv.groups, -1, length)


def reference_maps(model, name, x, pairs, signed):
    """|S| |v^T x_p| from an independent SVD (sign-free), or S v^T x_p with the layer's own Vh (signed)."""
    layer = model.get_submodule(name)
    s = layer.S.detach().double()
    if signed:
        vh = layer.Vh.detach().double()
    else:
        _, vh = reference_svd(layer.base_weight, layer.groups)
    if isinstance(layer, svftune.SVFLinear):
        out = torch.stack([x.double() @ vh[0, r] * s[0, r] for _, r in pairs], dim=-1)
        return out if signed else out.abs()
    patches = reference_patches(x, layer)
    inner = model.get_submodule(name)
    h = (x.shape[2] + 2 * inner.padding[0] - inner.dilation[0] * (inner.kernel_size[0] - 1) - 1) // inner.stride[0] + 1
    w = (x.shape[3] + 2 * inner.padding[1] - inner.dilation[1] * (inner.kernel_size[1] - 1) - 1) // inner.stride[1] + 1
    maps = [torch.einsum("k,nkl->nl", vh[g, r], patches[:, g]) * s[g, r] for g, r in pairs]
    out = torch.stack(maps, dim=1).reshape(x.shape[0], len(pairs), h, w)
    return out if signed else out.abs()


def layer_input(model, name, x):
    seen = []
    handle = model.get_submodule(name).register_forward_pre_hook(lambda m, a: seen.append(a[0].detach()))
    with torch.no_grad():
        model(x)
    handle.remove()
    return seen[0]


def brute_top(layer, top, by):
    delta = (layer.S.detach().double() - layer.S0.double()).reshape(-1).tolist()
    s0 = layer.S0.double().reshape(-1).tolist()
    key = [d / s if by == "relative" else d for d, s in zip(delta, s0, strict=True)]
    rank = layer.S.shape[1]
    grew = sorted((i for i in range(len(key)) if key[i] > 0), key=lambda i: -key[i])[:top]
    shrank = sorted((i for i in range(len(key)) if key[i] < 0), key=lambda i: key[i])[:top]
    return [(i // rank, i % rank) for i in grew], [(i // rank, i % rank) for i in shrank]


# ------------------------------------------------------------------------------------------------ changes
@pytest.mark.parametrize("by", ["absolute", "relative"])
def test_changes_are_exact_and_sorted(by):
    model = make_model()
    changes = plots.singular_value_changes(model, by=by)
    assert list(changes) == ["conv", "grouped", "head"]
    for name, entry in changes.items():
        layer = model.get_submodule(name)
        s0, _ = reference_svd(layer.base_weight, layer.groups)
        s = layer.S.detach().double()
        assert entry.total == len(entry) == s.numel() and (entry.groups, entry.rank) == tuple(s.shape)
        for i in range(len(entry)):
            g, r = int(entry.group[i]), int(entry.index[i])
            assert float(entry.s0[i]) == pytest.approx(float(s0[g, r]), rel=1e-12, abs=1e-12)
            assert float(entry.s[i]) == float(s[g, r])
            assert float(entry.delta[i]) == pytest.approx(float(s[g, r] - s0[g, r]), abs=1e-12)
            assert float(entry.relative[i]) == pytest.approx(float((s[g, r] - s0[g, r]) / s0[g, r]), rel=1e-9)
        expected = entry.relative if by == "relative" else entry.delta
        assert torch.equal(entry.key, expected)
        assert bool((entry.key[:-1] >= entry.key[1:]).all()), "largest increase first, largest decrease last"
        assert entry.delta.dtype == torch.float64


def test_changes_top_keeps_the_extremes_of_both_sides():
    model = make_model()
    full = plots.singular_value_changes(model, "grouped")["grouped"]
    top = plots.singular_value_changes(model, "grouped", top=2)["grouped"]
    assert len(top) == 4 and top.total == full.total == 9
    assert torch.equal(top.delta, torch.cat([full.delta[:2], full.delta[-2:]]))
    assert [top.label(i) for i in range(4)] == [full.label(i) for i in (0, 1, 7, 8)]
    assert len(plots.singular_value_changes(model, "conv", top=10)["conv"]) == 5  # 2 * top >= count: all


def test_changes_from_a_checkpoint_hold_only_deltas(tmp_path):
    model = make_model(torch.float32)
    svftune.save_svf(model, tmp_path / "c.safetensors")
    from_file = plots.singular_value_changes(tmp_path / "c.safetensors", ["head", "conv"])
    from_model = plots.singular_value_changes(model)
    assert list(from_file) == ["head", "conv"]
    for name, entry in from_file.items():
        assert entry.s0 is None and entry.s is None and entry.relative is None
        assert torch.allclose(entry.delta, from_model[name].delta, rtol=0, atol=1e-6)
    with pytest.raises(plots.PlotError, match="needs the pretrained singular values S0"):
        plots.singular_value_changes(tmp_path / "c.safetensors", by="relative")


def test_relative_change_of_a_zero_singular_value():
    torch.manual_seed(1)
    lin = nn.Linear(3, 3, bias=False).double()
    with torch.no_grad():
        lin.weight[2] = lin.weight[0] + lin.weight[1]  # rank 2: S0[2] == 0 up to rounding
    model = nn.Sequential(lin)
    svftune.apply_svf(model)
    layer = model[0]
    with torch.no_grad():
        layer.S0[0, 2] = 0.0
        layer.S[0, 2] = 0.5
        layer.S[0, 0] = layer.S0[0, 0]
    entry = plots.singular_value_changes(model, by="relative")["0"]
    assert entry.key[0] == float("inf") and int(entry.index[0]) == 2
    assert 0.0 in entry.key.tolist()  # unchanged values: 0, not nan
    assert not torch.isnan(entry.key).any()


# ------------------------------------------------------------------------------------------------ activations
@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("name", ["conv", "grouped", "head"])
def test_activation_maps_match_an_independent_float64_computation(name, signed):
    model = make_model()
    x = torch.randn(2, 3, 11, 8, dtype=torch.float64)
    acts = plots.subspace_activations(model, name, x, top=2, signed=signed)
    pairs = [(d.group, d.index) for d in acts.directions]
    inner = layer_input(model, name, x)
    expected = reference_maps(model, name, inner, pairs, signed)
    assert acts.maps.dtype == torch.float64 and acts.maps.shape == expected.shape
    torch.testing.assert_close(acts.maps, expected, rtol=1e-10, atol=1e-10)
    if name == "head":
        assert acts.maps.shape == (2, len(pairs))


def test_activation_maps_of_a_conv1d_with_stride_dilation_and_circular_padding():
    torch.manual_seed(7)
    model = nn.Sequential(nn.Conv1d(4, 6, 3, stride=2, padding=2, dilation=2, groups=2, padding_mode="circular"))
    model = svftune.apply_svf(model.double()).eval()
    layer = model[0]
    with torch.no_grad():
        layer.S.add_(0.1 * torch.randn_like(layer.S))
    x = torch.randn(2, 4, 13, dtype=torch.float64)
    acts = plots.subspace_activations(model, "0", x, top=2)
    padded = F.pad(x, (2, 2), mode="circular")
    patches = padded.unfold(2, 5, 2)[..., ::2]  # (N, C, L, 3): dilation 2 picks every second of 5
    s, vh = layer.S.detach(), layer.Vh.detach()
    for k, d in enumerate(acts.directions):
        group_patches = patches[:, 2 * d.group : 2 * d.group + 2].permute(0, 2, 1, 3).reshape(2, patches.shape[2], -1)
        ref = (group_patches @ vh[d.group, d.index] * s[d.group, d.index]).abs()
        torch.testing.assert_close(acts.maps[:, k], ref, rtol=1e-12, atol=1e-12)
    assert acts.maps.shape == (2, len(acts.directions), 7)


def test_activation_maps_of_a_float32_model_are_computed_in_float64():
    model = make_model(torch.float32)
    x = torch.randn(1, 3, 9, 9)
    acts = plots.subspace_activations(model, "grouped", x, directions=[(0, 1), (2, 0), 2])
    chosen = [(d.group, d.index, d.kind) for d in acts.directions]
    assert chosen == [(0, 1, "chosen"), (2, 0, "chosen"), (0, 2, "chosen")]
    inner = layer_input(model, "grouped", x)
    layer = model.grouped
    patches = reference_patches(inner, layer)
    vh, s = layer.Vh.double(), layer.S.detach().double()
    for k, (g, r) in enumerate([(0, 1), (2, 0), (0, 2)]):
        ref = (torch.einsum("k,nkl->nl", vh[g, r], patches[:, g]) * s[g, r]).abs().reshape(1, *acts.maps.shape[2:])
        torch.testing.assert_close(acts.maps[:, k], ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("by", ["absolute", "relative"])
def test_the_chosen_directions_are_the_true_top_k(by):
    model = make_model(seed=3)
    for name in ("conv", "grouped", "head"):
        layer = model.get_submodule(name)
        grew, shrank = brute_top(layer, 2, by)
        acts = plots.subspace_activations(model, name, torch.randn(1, 3, 8, 8, dtype=torch.float64), top=2, by=by)
        assert [(d.group, d.index) for d in acts.directions if d.kind == "grew"] == grew
        assert [(d.group, d.index) for d in acts.directions if d.kind == "shrank"] == shrank
        for d in acts.directions:
            assert d.s0 == float(layer.S0[d.group, d.index]) and d.s == float(layer.S.detach()[d.group, d.index])


def test_unchanged_values_are_never_chosen_and_ties_go_to_the_lower_index():
    model = make_model()
    layer = model.grouped
    with torch.no_grad():
        layer.S.copy_(layer.S0)
        layer.S[1, 2] += 0.1
        layer.S[0, 0] += 0.1  # tied with (1, 2): (0, 0) first
        layer.S[2, 1] -= 0.3
    acts = plots.subspace_activations(model, "grouped", torch.randn(1, 3, 8, 8, dtype=torch.float64), top=3)
    assert [(d.group, d.index, d.kind) for d in acts.directions] == [(0, 0, "grew"), (1, 2, "grew"), (2, 1, "shrank")]
    with torch.no_grad():
        layer.S.copy_(layer.S0)
    with pytest.raises(plots.PlotError, match="no singular value of 'grouped' changed"):
        plots.subspace_activations(model, "grouped", torch.randn(1, 3, 8, 8, dtype=torch.float64))


def test_the_forward_stops_at_the_layer_and_accepts_a_callable():
    model = make_model()
    calls = []
    model.head.register_forward_pre_hook(lambda m, a: calls.append("head"))
    x = torch.randn(1, 3, 8, 8, dtype=torch.float64)
    plots.subspace_activations(model, "grouped", x)
    assert calls == []  # stopped before the head
    acts = plots.subspace_activations(model, "conv", lambda: model.conv(x), directions=[0])
    assert acts.maps.shape[:2] == (1, 1)
    with pytest.raises(plots.PlotError, match="never called 'head'"):
        plots.subspace_activations(model, "head", lambda: model.conv(x))


def test_errors_name_the_svf_layers():
    model = make_model()
    x = torch.randn(1, 3, 8, 8, dtype=torch.float64)
    with pytest.raises(plots.PlotError, match=r"no layer 'nope'.*SVF layers are: conv, grouped, head"):
        plots.subspace_activations(model, "nope", x)
    with pytest.raises(plots.PlotError, match=r"'lift' is a Conv2d, not an SVF layer.*conv, grouped, head"):
        plots.subspace_activations(model, "lift", x)
    with pytest.raises(plots.PlotError, match=r"no SVF layer 'lift' in the model.*conv, grouped, head"):
        plots.singular_value_changes(model, "lift")
    with pytest.raises(plots.PlotError, match=r"out of range.*groups 0\.\.2, indices 0\.\.2"):
        plots.subspace_activations(model, "grouped", x, directions=[(3, 0)])
    with pytest.raises(plots.PlotError, match="by='sideways' is not valid"):
        plots.singular_value_changes(model, by="sideways")
    with pytest.raises(plots.PlotError, match="top must be at least 1"):
        plots.singular_value_changes(model, top=0)


# ------------------------------------------------------------------------------------------------ figures
def test_figures_have_the_expected_axes(tmp_path):
    pytest.importorskip("matplotlib")
    model = make_model()
    changes = plots.singular_value_changes(model)
    fig = plots.plot_singular_value_changes(changes, layer="grouped", top=2)
    assert len(fig.axes) == 2
    right = fig.axes[1]
    assert len(right.patches) == 4  # 2 increases + 2 decreases
    assert fig.get_suptitle() == "grouped"
    plots.to_png(fig, tmp_path / "c.png")
    assert (tmp_path / "c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    x = torch.rand(1, 3, 12, 10, dtype=torch.float64)
    acts = plots.subspace_activations(model, "conv", x, top=2)
    fig = plots.plot_subspace_activations(x[0], acts)
    assert len(fig.axes) == 1 + len(acts.directions) == 5
    titles = [axis.get_title() for axis in fig.axes]
    first = acts.directions[0]
    assert titles[0] == "input" and titles[1].startswith(f"grew r={first.index}\n{first.delta:+.3g}")
    fig = plots.plot_subspace_activations(x[0].permute(1, 2, 0).numpy() * 255, acts, overlay=False)
    assert len(fig.axes) == 5
    grouped = plots.subspace_activations(model, "grouped", x, directions=[(1, 2)])
    fig = plots.plot_subspace_activations(x[0], grouped)
    assert len(fig.axes) == 2 and fig.axes[1].get_title().startswith("chosen g=1 r=2")


def test_figure_errors():
    pytest.importorskip("matplotlib")
    model = make_model()
    acts = plots.subspace_activations(model, "head", torch.randn(1, 3, 8, 8, dtype=torch.float64))
    with pytest.raises(plots.PlotError, match="draws 2-D maps"):
        plots.plot_subspace_activations(torch.rand(3, 8, 8), acts)
    conv = plots.subspace_activations(model, "conv", torch.randn(1, 3, 8, 8, dtype=torch.float64))
    with pytest.raises(plots.PlotError, match="sample 1 is out of range"):
        plots.plot_subspace_activations(torch.rand(3, 8, 8), conv, sample=1)
    with pytest.raises(plots.PlotError, match=r"image must be .*got shape \(2, 8, 8\)"):
        plots.plot_subspace_activations(torch.rand(2, 8, 8), conv)
    with pytest.raises(plots.PlotError, match="no layer 'x' in the changes"):
        plots.plot_singular_value_changes(plots.singular_value_changes(model), layer="x")


def test_drawing_without_matplotlib_says_how_to_install(monkeypatch):
    model = make_model()
    changes = plots.singular_value_changes(model, "conv")  # computing needs no matplotlib
    pytest.importorskip("matplotlib.figure")  # cached submodule: the check must still see the package missing
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match=r"pip install 'svftune\[plots\]'"):
        plots.plot_singular_value_changes(changes)


# ------------------------------------------------------------------------------------------------ CLI
def plain_net() -> nn.Module:
    """Factory for ``svftune plot-activations --model test_plots:plain_net`` (weights come from --weights)."""
    return Net()


@pytest.fixture
def cli_files(tmp_path):
    """Base weights (.pt and .safetensors), a checkpoint trained on them and an RGB image."""
    import safetensors.torch

    pytest.importorskip("matplotlib")
    from PIL import Image

    torch.manual_seed(5)
    base = Net()
    torch.save(base.state_dict(), tmp_path / "base.pt")
    safetensors.torch.save_file(
        {k: v.contiguous() for k, v in base.state_dict().items()}, tmp_path / "base.safetensors"
    )
    svftune.apply_svf(base, layers=["conv", "grouped", "head"])
    with torch.no_grad():
        for _, layer in svftune.svf_layers(base):
            layer.S.add_(0.1 * torch.randn_like(layer.S))
        base.grouped.S[1, 0] += 1.0  # the largest change of the model
    svftune.save_svf(base, tmp_path / "ckpt.safetensors")
    rng = torch.Generator().manual_seed(0)
    pixels = (torch.rand(20, 17, 3, generator=rng) * 255).to(torch.uint8).numpy()
    Image.fromarray(pixels).save(tmp_path / "photo.png")
    return tmp_path, base


def test_cli_plot_changes(cli_files, capsys):
    from svftune.cli import main

    folder, _ = cli_files
    out = folder / "changes.png"
    assert main(["plot-changes", str(folder / "ckpt.safetensors"), "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "grouped, 9 singular values" in capsys.readouterr().out  # default: the layer with the largest change
    args = ["plot-changes", str(folder / "ckpt.safetensors"), "--out", str(out), "--layer", "conv", "--by", "relative"]
    assert main(args) == 2
    assert "needs the pretrained singular values S0" in capsys.readouterr().err
    for base in ("base.pt", "base.safetensors"):
        assert main([*args, "--base", str(folder / base)]) == 0
        assert "wrote" in capsys.readouterr().out
    assert main(["plot-changes", str(folder / "ckpt.safetensors"), "--out", str(out), "--layer", "lift"]) == 2
    assert "no SVF layer 'lift' in the checkpoint" in capsys.readouterr().err


def test_cli_plot_changes_with_base_recovers_s0(cli_files):
    """The base-rebuilt module (what --base uses) knows S0 and S exactly."""
    from svftune.cli import base_model, read_state_dict

    folder, model = cli_files
    root = base_model(read_state_dict(folder / "base.pt"), svftune.read_svf(folder / "ckpt.safetensors"))
    for name, layer in svftune.svf_layers(model):
        rebuilt = root.get_submodule(name)
        torch.testing.assert_close(rebuilt.S0, layer.S0, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(rebuilt.S.detach(), layer.S.detach(), rtol=1e-6, atol=1e-6)


def test_cli_plot_activations(cli_files, capsys):
    from svftune.cli import main

    folder, _ = cli_files
    out = folder / "maps.png"
    common = ["plot-activations", "--model", "test_plots:plain_net", "--weights", str(folder / "base.pt")]
    common += ["--checkpoint", str(folder / "ckpt.safetensors"), "--out", str(out), "--size", "16"]
    assert main([*common, "--layer", "grouped", "--image", str(folder / "photo.png"), "--top", "2"]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "4 directions of grouped" in capsys.readouterr().out
    assert main([*common, "--layer", "grouped", "--image", str(folder / "missing.png")]) == 2
    assert "--image" in (err := capsys.readouterr().err) and "no such file" in err
    assert main([*common, "--layer", "nope", "--image", str(folder / "photo.png")]) == 2
    assert "no layer 'nope'; its SVF layers are: conv, grouped, head" in capsys.readouterr().err
    assert main([*common, "--layer", "act", "--image", str(folder / "photo.png")]) == 2
    assert "'act' is a ReLU, not an SVF layer" in capsys.readouterr().err
    bad = [*common, "--layer", "conv", "--image", str(folder / "photo.png")]
    bad[2] = "test_plots:nothing_here"
    assert main(bad) == 2
    assert "has no callable nothing_here" in capsys.readouterr().err
    (folder / "notimage.png").write_text("hello")
    assert main([*common, "--layer", "conv", "--image", str(folder / "notimage.png")]) == 2
    assert "cannot read it as an image" in capsys.readouterr().err
