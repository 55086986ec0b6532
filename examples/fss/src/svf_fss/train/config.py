"""Run configuration: one dataclass, TOML files (one per table row), ``key=value`` overrides from the command line."""

from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

SCHEDULES = ("cosine", "poly", "constant")
AMP_MODES = ("none", "fp16", "bf16")
CHECKPOINT_CHOICES = ("best", "last")


class ConfigError(ValueError):
    """A configuration file or override is wrong; the message says which key and what is allowed."""


@dataclass
class RunConfig:
    """Everything one training or test run depends on. Defaults are the paper's Pascal-5i SVF settings."""

    # what to train
    dataset: str = "pascal"  # pascal | coco | mini
    data_root: str = "data/VOC2012"
    fold: int = 0
    shots: int = 1
    method: str = "baseline"  # baseline | pfenet | bam
    backbone: str = "resnet50_v2"  # resnet50_v2 | resnet50 | vgg16_bn | mobilenet_v2
    backbone_weights: str | None = None  # ImageNet weights file ("offline": the bundled MobileNetV2)
    dilation: str = "pspnet"  # ResNet layer3/4 dilation: pspnet (every block 2/4) | torchvision (first block 1/2)
    kshot: str = "mean"  # baseline's K-shot rule for prototypes and priors: mean | sum (the SVF release's)
    strategy: str = "svf"  # see svf_fss.models.strategies (frozen, svf, full, bn, svf+bn, bias, svf-u, ...)
    strategy_layers: list[str] | None = None  # stages the strategy acts on (default: its own, SVF: layer2-4)
    conv_kind: str | None = None  # partial fine-tuning by conv kind: "3x3" or "1x1"
    svf_form: str = "auto"
    lora_lr_scale: float | None = None  # strategy "lora": lr scale of the LoRA factors (default: lr/10, like SVF's S)
    base_learner: str | None = None  # BAM: the stage-1 PSPNet checkpoint
    trick: bool = True  # the dataset trick (dagger in the tables)
    # optimisation
    epochs: int = 200
    max_iterations: int | None = None  # stop early (smoke tests, the mini benchmark)
    batch_size: int = 8  # in total, over all processes
    lr: float = 0.015
    momentum: float = 0.9
    weight_decay: float = 1e-4
    schedule: str = "cosine"  # per-iteration cosine to 0; "poly" (power 0.9); "constant" (the released code)
    poly_power: float = 0.9
    grad_clip: float | None = None
    amp: str = "none"  # none | fp16 | bf16 (CUDA: fp16 with a gradient scaler)
    checkpoint_backbone: bool = False  # activation checkpointing of the backbone stages
    sync_bn: bool = True  # multi-GPU: SyncBatchNorm conversion (norm layers stay frozen where they were)
    # data
    crop: int | None = None  # default: the dataset's (473 Pascal, 641 COCO)
    scale: list[float] | None = None  # RandScale range; default: the dataset's ([0.9, 1.1] Pascal, [0.8, 1.25] COCO)
    test_size: int | None = None
    workers: int = 4
    # evaluation
    val_every: int = 1  # epochs
    val_episodes: int = 1000
    test_episodes: int = 1000
    test_seeds: list[int] = field(default_factory=lambda: [321])
    test_checkpoint: str = "best"  # best | last
    # run
    seed: int = 321
    output: str = "runs/{dataset}/{backbone}/{method}-{strategy}/{shots}shot/fold{fold}"
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    resume: bool = True  # continue from the run directory's last checkpoint when there is one
    progress: bool = True
    tensorboard: bool = True

    def validate(self) -> RunConfig:
        """Raise :class:`ConfigError` for values no run can use."""
        checks = [
            (self.dataset in ("pascal", "coco", "mini"), "dataset must be pascal, coco or mini"),
            (self.method in ("baseline", "pfenet", "bam"), "method must be baseline, pfenet or bam"),
            (self.dilation in ("pspnet", "torchvision"), "dilation must be pspnet or torchvision"),
            (self.kshot in ("mean", "sum"), "kshot must be mean or sum"),
            (self.kshot == "mean" or self.method == "baseline", "kshot=sum is the baseline's option only"),
            (0 <= self.fold <= 3, "fold must be 0, 1, 2 or 3"),
            (self.shots >= 1, "shots must be >= 1"),
            (self.schedule in SCHEDULES, f"schedule must be one of {', '.join(SCHEDULES)}"),
            (self.amp in AMP_MODES, f"amp must be one of {', '.join(AMP_MODES)}"),
            (self.test_checkpoint in CHECKPOINT_CHOICES, "test_checkpoint must be best or last"),
            (self.epochs >= 1 and self.batch_size >= 1, "epochs and batch_size must be >= 1"),
            (self.lr > 0, "lr must be > 0"),
            (self.lora_lr_scale is None or self.lora_lr_scale > 0, "lora_lr_scale must be > 0"),
            (self.val_every >= 1, "val_every must be >= 1"),
            (self.max_iterations is None or self.max_iterations >= 1, "max_iterations must be >= 1"),
            (bool(self.test_seeds), "test_seeds must list at least one seed"),
            (self.scale is None or (len(self.scale) == 2 and 0 < self.scale[0] <= self.scale[1]), "scale: [lo, hi]"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        return self

    def output_dir(self) -> Path:
        return Path(self.output.format(**dataclasses.asdict(self)))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


FIELDS = {f.name: f for f in dataclasses.fields(RunConfig)}


def _check_keys(values: dict[str, Any], where: str) -> None:
    unknown = sorted(set(values) - set(FIELDS))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(FIELDS)}")


def parse_override(text: str) -> tuple[str, Any]:
    """``"lr=0.01"`` -> ``("lr", 0.01)``; values use TOML syntax, bare words are strings."""
    key, sep, raw = text.partition("=")
    key = key.strip().replace("-", "_")
    if not sep or not key:
        raise ConfigError(f"override {text!r} is not KEY=VALUE (e.g. fold=1, lr=0.01, strategy=frozen)")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    if raw.strip().lower() in ("none", "null"):
        value = None
    return key, value


def load_config(path: str | Path | None = None, overrides: list[str] | dict[str, Any] | None = None) -> RunConfig:
    """Defaults, then the TOML file (which may name a ``base`` file it extends), then the overrides."""
    values: dict[str, Any] = {}
    if path is not None:
        values = _read_toml(Path(path), seen=())
    pairs = overrides.items() if isinstance(overrides, dict) else map(parse_override, overrides or [])
    for key, value in pairs:
        _check_keys({key: value}, "override")
        values[key] = value
    try:
        config = RunConfig(**values)
    except TypeError as err:  # pragma: no cover - keys are checked above
        raise ConfigError(str(err)) from None
    _coerce(config)
    return config.validate()


def _read_toml(path: Path, seen: tuple[Path, ...]) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist (configs live in examples/fss/configs/)")
    if path.resolve() in seen:
        raise ConfigError(f"config {path} extends itself through 'base'")
    try:
        values = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path} is not valid TOML: {err}") from None
    base = values.pop("base", None)
    merged = _read_toml(path.parent / base, (*seen, path.resolve())) if base else {}
    values.pop("description", None)
    _check_keys(values, str(path))
    merged.update(values)
    return merged


def _coerce(config: RunConfig) -> None:
    """Make ints given for float keys floats, and check simple types, with a message naming the key."""
    for name, f in FIELDS.items():
        value = getattr(config, name)
        kind = str(f.type)
        if value is None:
            if "None" not in kind:
                raise ConfigError(f"{name} cannot be None")
            continue
        number = isinstance(value, int | float) and not isinstance(value, bool)
        if kind.startswith("float"):
            if not number:
                raise ConfigError(f"{name} must be a number, got {value!r}")
            setattr(config, name, float(value))
        elif kind.startswith("int") and not (isinstance(value, int) and not isinstance(value, bool)):
            raise ConfigError(f"{name} must be an integer, got {value!r}")
        elif kind.startswith("bool") and not isinstance(value, bool):
            raise ConfigError(f"{name} must be true or false, got {value!r}")
        elif kind.startswith("str") and not isinstance(value, str):
            raise ConfigError(f"{name} must be a string, got {value!r}")


def dump_config(config: RunConfig, path: Path) -> None:
    """Write ``config`` as indented JSON (the ``config.json`` of a run folder)."""
    path.write_text(json.dumps(config.to_dict(), indent=2) + "\n")
