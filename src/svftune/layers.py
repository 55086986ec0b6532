"""SVF layers: a Conv/Linear layer whose weight is ``W + U diag(S - S0) Vh`` with only ``S`` trained.

Each weight is folded to ``(groups, out/groups, in/groups * prod(kernel))`` and decomposed per group with a
full thin SVD (rank ``R = min(out/groups, in/groups * prod(kernel))``, no truncation). ``U`` and ``Vh`` are
frozen; ``S`` (one vector per group) is the only trainable tensor. Writing the weight as the original ``W``
plus a correction that is exactly zero while ``S == S0`` makes an untouched layer bit-identical to the
original, in every dtype, and lets ``svftune.unapply_svf`` hand back the original weights unchanged.

Training can run one of two forms that compute the same function (see ``docs/concepts.md``):

- ``"three_op"`` (the paper's form): conv with ``Vh``, scale by ``S``, 1x1 conv with ``U``. Its backward needs
  no weight gradient: ``dS`` is ``U^T dY`` times the ``Vh``-conv output saved in the forward.
- ``"rebuilt"``: one conv with the rebuilt weight. Cheaper forward, but the backward needs a full weight
  gradient.
- ``"lean"``: the three-op form, but ``z`` is not saved: the backward recomputes it from the layer input (kept
  alive by the layer before anyway). One more ``Vh`` conv per step; no activation memory of its own, so a
  step's peak memory is about that of fine-tuning the same weights directly (benchmarks/README.md). Never
  chosen by "auto".

``form="auto"`` picks per training call from the multiply-add counts of the actual input. Eval-mode forwards use
the rebuilt weight (exactly ``W`` while ``S == S0``); forwards that need no gradient for the layer use one conv
with the rebuilt weight, cached until a factor changes.
"""

from __future__ import annotations

import copy
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize

from ._three_op import CONV, ScaleProject
from .constants import FACTOR_NAMES, HALF_DTYPES, exact_dtype
from .decompose import thin_svd

FORMS = ("auto", "three_op", "rebuilt", "lean")
#: Cost of a weight-gradient multiply-add relative to a forward one in the ``form="auto"`` cost model. Measured
#: on CPU (oneDNN): the rebuilt form's weight-gradient conv over a strided input runs slower than its count
#: says (benchmarks/README.md, "Cost model"); 1.4 flips only the near-tie stride-2 1x1 downsample convs.
WEIGHT_GRAD_COST = 1.4
FACTORS = "USV"


def normalize_train(train: str) -> str:
    """Validate which factors train (``"S"`` by default; the paper's Table 7 also tries U and V)."""
    letters = train.upper() if isinstance(train, str) else None
    if not letters or any(c not in FACTORS for c in letters):
        raise ValueError(
            f"train={train!r} is not valid: give a string of factor letters from 'U', 'S', 'V' "
            "(e.g. 'S', the default, or 'US' for the paper's Table 7 ablations)"
        )
    return "".join(c for c in FACTORS if c in letters)


def normalize_form(form: str) -> str:
    """Validate a training form name (one of ``FORMS``); raises ValueError otherwise."""
    if form not in FORMS:
        raise ValueError(f"form={form!r} is not valid: choose one of {', '.join(map(repr, FORMS))}")
    return form


def unsupported_reason(module: nn.Module) -> str | None:
    """Why ``module`` cannot be adapted, or ``None`` when it can. One place for every refusal."""
    if isinstance(module, nn.modules.lazy.LazyModuleMixin) and module.has_uninitialized_params():
        return "is a lazy module whose weight is not initialised yet; run one forward pass before apply_svf"
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        return "is a transposed convolution, which SVF does not support; leave it out with exclude=[...]"
    if parametrize.is_parametrized(module):
        return (
            "carries a torch.nn.utils.parametrize parametrization (e.g. weight norm), so its weight is not "
            "a plain tensor; remove the parametrization or leave the layer out with exclude=[...]"
        )
    kind = layer_kind(module)
    if kind is None:
        return f"is a {type(module).__name__}, not one of the supported layer types ({', '.join(LAYER_KINDS)})"
    base = kind.plain_class()
    for method in ("forward", "_conv_forward"):
        if getattr(type(module), method, None) is not getattr(base, method, None):
            return (
                f"is a {type(module).__name__}, a subclass of {base.__name__} that overrides {method}() "
                "(e.g. timm's Conv2dSame, which pads the input in forward), so replacing it would silently change "
                "the model; leave it out with exclude=[...]"
            )
    if kind.transposed and tuple(module.weight.shape) != (module.nx, module.nf):
        return f"has a weight of shape {tuple(module.weight.shape)}, not (nx, nf) = ({module.nx}, {module.nf})"
    extra = [n for n, _ in module.named_parameters(recurse=False) if n not in ("weight", "bias")]
    extra += [n for n, _ in module.named_buffers(recurse=False)] + [n for n, _ in module.named_children()]
    if extra:
        return f"has extra parameters, buffers or submodules ({', '.join(extra)}) that SVF would not carry over"
    hooks = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
    if any(getattr(module, h, None) for h in hooks):
        return "has hooks registered on it, which replacing it would lose; register them after apply_svf"
    if not isinstance(module.weight, Tensor) or not module.weight.is_floating_point():
        return "has no floating-point weight tensor"
    return None


def svf_layer_from(module: nn.Module, **kwargs: Any) -> SVFLayer:
    """Build the SVF layer that matches a plain layer: SVFLinear, SVFConv1d/2d/3d or SVFConv1D (``LAYER_KINDS``).

    Args:
        module: an ``nn.Linear``, ``nn.Conv1d``/``Conv2d``/``Conv3d`` or transformers' ``Conv1D`` (or a subclass
            that does not change the computation). Its ``weight`` and ``bias`` Parameters are reused (and frozen),
            not copied.
        **kwargs: passed to the layer: ``train``, ``form``, ``decompose`` (see ``SVFLayer``).

    Returns:
        The SVF layer; it computes exactly what ``module`` computed while its singular values are untouched.

    Raises:
        TypeError: ``module`` cannot be adapted (not a supported layer type, a transposed conv, a lazy module before its
            first forward, a subclass overriding ``forward``, a parametrized layer, a layer with hooks or extra
            parameters); the message says why.

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> import svftune
        >>> _ = torch.manual_seed(0)
        >>> conv = nn.Conv2d(8, 8, 3, padding=1, groups=4)
        >>> x = torch.randn(1, 8, 5, 5)
        >>> reference = conv(x)
        >>> layer = svftune.svf_layer_from(conv)
        >>> type(layer).__name__, tuple(layer.S.shape)  # 4 groups of rank min(8/4, 8/4*3*3) = 2
        ('SVFConv2d', (4, 2))
        >>> with torch.no_grad():
        ...     torch.equal(layer(x), reference)
        True
        >>> svftune.svf_layer_from(nn.ConvTranspose2d(3, 3, 3))
        Traceback (most recent call last):
            ...
        TypeError: cannot apply SVF to this ConvTranspose2d: it is a transposed convolution, ...
    """
    reason = unsupported_reason(module)
    if reason is not None:
        raise TypeError(f"cannot apply SVF to this {type(module).__name__}: it {reason}")
    return layer_kind(module).svf_class(module, **kwargs)


class SVFLayer(nn.Module):
    """Common machinery of the SVF layers; use ``SVFLinear`` or ``SVFConv2d`` (1d/3d).

    Attributes:
        base_weight: the original weight ``Parameter`` (frozen), handed back by ``unapply_svf``.
        bias: the original bias ``Parameter`` (frozen), or ``None``.
        U: ``(groups, out/groups, R)`` left singular vectors; trains only when ``train`` contains ``"U"``.
        S: ``(groups, R)`` singular values, the trained parameter (float32 for float16/bfloat16 layers).
        Vh: ``(groups, R, fan_in)`` right singular vectors; trains only when ``train`` contains ``"V"``.
        S0: buffer: ``S`` at decomposition time.
        residual: ``W - U0 diag(S0) V0h`` when ``U`` or ``V`` trains, else ``None``.
        groups: the layer's ``groups`` (1 for Linear).
        train_factors: which factors train, e.g. ``"S"``.
        form: the training form, ``"auto"``, ``"three_op"``, ``"rebuilt"`` or ``"lean"``; may be set per layer.
    """

    base_type: ClassVar[type[nn.Module] | None]  # the plain class; see plain_class()
    kind: ClassVar[str]  # its name in LAYER_KINDS (and in checkpoints)
    spatial_dims: ClassVar[int]  # 0 for Linear-like layers

    def __init__(
        self,
        base: nn.Module,
        *,
        train: str = "S",
        form: str = "auto",
        decompose: Callable[[Tensor], tuple[Tensor, Tensor, Tensor]] | None = None,
    ) -> None:
        """Decompose ``base`` and take over its tensors (its weight and bias become frozen).

        Args:
            base: the layer to adapt; its ``weight``/``bias`` Parameters are reused, not copied.
            train: which factors train: ``"S"`` (default) or a combination of ``"U"``, ``"S"``, ``"V"``.
            form: training form, ``"auto"``, ``"three_op"``, ``"rebuilt"`` or ``"lean"`` (see the module
                docstring).
            decompose: computes ``(U, S, Vh)`` of the ``(groups, out/groups, fan_in)`` weight matrices, as
                ``svftune.thin_svd`` (the default) does, e.g. from a decomposition cache.
        """
        super().__init__()
        plain = self.plain_class()
        if plain is None or not isinstance(base, plain):
            wanted = plain.__name__ if plain is not None else self.kind
            raise TypeError(f"{type(self).__name__} wraps a {wanted}, got {type(base).__name__}")
        reason = unsupported_reason(base)
        if reason is not None:
            raise TypeError(f"cannot apply SVF to this {type(base).__name__}: it {reason}")
        self.train_factors = normalize_train(train)
        self.form = normalize_form(form)
        weight = base.weight
        self.groups = getattr(base, "groups", 1)
        self._copy_geometry(base)
        # The plain layer without its tensors: unapply/merge re-attach weights to a copy of it, so the
        # original class (e.g. a Linear subclass) and attributes come back. Kept out of the module tree.
        skeleton = copy.copy(base)
        skeleton._parameters = dict.fromkeys(base._parameters)
        self.__dict__["_skeleton"] = skeleton
        self.__dict__["_base_requires_grad"] = (weight.requires_grad, getattr(base.bias, "requires_grad", False))
        self.__dict__["_cache"] = None

        matrices = self._matrices(weight.detach())
        u, s, vh = (decompose or thin_svd)(matrices)
        value_dtype = torch.float32 if weight.dtype in HALF_DTYPES else weight.dtype  # S stays exact to train
        weight.requires_grad_(False)
        self.base_weight = weight  # the original Parameter object, frozen: unapply hands it back untouched
        if base.bias is not None:
            base.bias.requires_grad_(False)
        self.register_parameter("bias", base.bias)
        # contiguous: LAPACK's column-major strides would survive .to() and cost a copy in every forward
        self.U = nn.Parameter(u.to(weight.dtype).contiguous(), requires_grad="U" in self.train_factors)
        self.S = nn.Parameter(s.to(value_dtype), requires_grad="S" in self.train_factors)
        self.Vh = nn.Parameter(vh.to(weight.dtype).contiguous(), requires_grad="V" in self.train_factors)
        self.register_buffer("S0", self.S.detach().clone())
        if "U" in self.train_factors or "V" in self.train_factors:
            # Training U or V changes the basis, so W + U diag(S - S0) Vh no longer applies: keep the
            # (tiny) residual W - U0 diag(S0) V0h instead and use W = residual + U diag(S) Vh.
            residual = matrices.to(u.dtype) - (u * s.unsqueeze(1)) @ vh
            self.residual = nn.Parameter(residual.to(weight.dtype), requires_grad=False)
        else:
            self.register_parameter("residual", None)
        self.train(base.training)  # start in the replaced layer's mode (unapply hands that mode back)

    @classmethod
    def from_module(cls, base: nn.Module, **kwargs: Any) -> SVFLayer:
        """Build from an existing layer (the same as calling the class).

        Args:
            base: the layer to adapt.
            **kwargs: ``train``, ``form``, ``decompose``, as for the constructor.

        Returns:
            The SVF layer.

        Examples:
            >>> from torch import nn
            >>> import svftune
            >>> layer = svftune.SVFConv2d.from_module(nn.Conv2d(3, 16, 3), train="US")
            >>> layer.rank, layer.train_factors, [name for name, p in layer.named_parameters() if p.requires_grad]
            (16, 'US', ['U', 'S'])
            >>> linear = nn.Linear(6, 4)
            >>> layer = svftune.SVFLinear(linear, form="lean")
            >>> layer.rank, layer.form, layer.base_weight is linear.weight
            (4, 'lean', True)
        """
        return cls(base, **kwargs)

    @classmethod
    def plain_class(cls) -> type[nn.Module] | None:
        """The plain layer class this SVF layer replaces (``None`` when its library is not loaded)."""
        return cls.base_type

    def _copy_geometry(self, base: nn.Module) -> None:
        raise NotImplementedError

    def _matrices(self, weight: Tensor) -> Tensor:
        """A weight of the plain layer's layout as its ``(groups, out/groups, fan_in)`` matrices."""
        return weight.reshape(self.groups, weight.shape[0] // self.groups, -1)

    def _from_matrices(self, matrices: Tensor) -> Tensor:
        """``(groups, rows, fan_in)`` matrices in the plain layer's weight layout (``groups * rows`` outputs)."""
        return matrices.reshape(-1, *self.base_weight.shape[1:])

    def factor_tensors(self) -> dict[str, Tensor]:
        """The layer's factor tensors by name (``constants.FACTOR_NAMES``: U, S, Vh and residual when present)."""
        return {name: t for name in FACTOR_NAMES if (t := getattr(self, name)) is not None}

    # ----------------------------------------------------------------------------------------- weights
    @property
    def rank(self) -> int:
        """Singular values per group."""
        return self.S.shape[-1]

    def effective_weight(self, dtype: torch.dtype | None = None) -> Tensor:
        """The weight this layer applies, differentiable in the trainable factors, computed in ``dtype``."""
        dtype = dtype or _compute_dtype(self.base_weight.dtype)
        u, vh = self.U.to(dtype), self.Vh.to(dtype)
        if self.residual is not None:
            w = self.residual.to(dtype) + (u * self.S.to(dtype).unsqueeze(1)) @ vh
            return self._from_matrices(w)
        delta = (u * (self.S.to(dtype) - self.S0.to(dtype)).unsqueeze(1)) @ vh
        return self.base_weight.to(dtype) + self._from_matrices(delta)

    @torch.no_grad()
    def merged_weight(self) -> Tensor:
        """The fine-tuned weight, rebuilt in float64 (float32 where unsupported) and cast once."""
        if self.residual is None and torch.equal(self.S, self.S0):
            return self.base_weight.detach().clone()
        exact = exact_dtype(self.base_weight.device)
        return self.effective_weight(exact).to(self.base_weight.dtype).contiguous()

    @property
    def weight(self) -> Tensor:
        """The effective weight, for code that reads ``layer.weight`` directly (e.g. nn.MultiheadAttention)."""
        if self._weight_needs_grad():
            return self.effective_weight().to(self.base_weight.dtype)
        return self._cached_weight()

    def _weight_needs_grad(self) -> bool:
        if not torch.is_grad_enabled():
            return False
        return self.base_weight.requires_grad or any(t.requires_grad for t in self.factor_tensors().values())

    def _cache_key(self) -> tuple:
        tensors = (*self.factor_tensors().values(), self.base_weight, self.S0)
        return tuple((t._version, t.data_ptr(), t.dtype, t.device) for t in tensors)

    @torch.no_grad()
    def _cached_weight(self) -> Tensor:
        """Rebuilt weight for eval/no-grad forwards, recomputed only when a factor changed."""
        key = self._cache_key()  # version counters: no device sync on a cache hit
        if self._cache is None or self._cache[0] != key:
            self.__dict__["_cache"] = None  # free the old weight before building the new one
            if self.residual is None and torch.equal(self.S, self.S0):
                weight = self.base_weight  # exactly the original: bit-identical outputs, no extra memory
            else:
                with torch.autocast(self.base_weight.device.type, enabled=False):
                    weight = self.effective_weight().to(self.base_weight.dtype)
            self.__dict__["_cache"] = (key, weight)
        return self._cache[1]

    def train(self, mode: bool = True) -> SVFLayer:
        """Set training mode as ``nn.Module.train`` does; entering training mode also drops the cached weight."""
        if mode:
            self.__dict__["_cache"] = None
        return super().train(mode)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_cache"] = None
        return state

    # ----------------------------------------------------------------------------------------- forward
    def uses_three_op(self, x: Tensor) -> bool:
        """Whether a training forward on ``x`` runs the three-op form (decided by ``form`` and cost)."""
        if self.residual is not None or self.base_weight.requires_grad:
            return False  # U, V or W train: only the rebuilt form carries their gradients
        if self.form != "auto":
            return self.form in ("three_op", "lean")
        three_op, rebuilt = self.training_costs(self._output_positions(x), x.requires_grad)
        return three_op < rebuilt

    def training_costs(self, positions: int, input_grad: bool) -> tuple[float, float]:
        """Multiply-adds of one forward + backward in the three-op and in the rebuilt form (the ``"auto"`` cost
        model; see the module docstring and docs/concepts.md), for ``positions`` output positions."""
        groups, out_per_group, rank = self.U.shape
        fan_in = self.Vh.shape[-1]
        grad = int(input_grad)
        three_op = positions * groups * rank * (fan_in * (1 + grad) + 2 * out_per_group)
        rebuilt = positions * groups * out_per_group * fan_in * (1 + WEIGHT_GRAD_COST + grad)
        rebuilt += 2 * groups * out_per_group * rank * fan_in  # rebuilding W and projecting dW onto S
        return float(three_op), float(rebuilt)

    def _output_positions(self, x: Tensor) -> int:
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        """Apply the layer to ``x`` with the effective weight ``W + U diag(S - S0) Vh``.

        Training forwards that need a gradient for the layer run its ``form`` (three-op, lean or rebuilt;
        ``"auto"`` decides per call, see ``uses_three_op``). Eval-mode forwards with gradients use the rebuilt
        weight. Forwards without gradients use one conv/linear with the rebuilt weight, cached until a factor
        changes (exactly the original weight while ``S == S0``).
        """
        if not self._weight_needs_grad():
            return self._apply_weight(x, self._cached_weight())
        if self.training and self.uses_three_op(x):  # eval + grad: rebuilt, exact while S == S0
            if self.form == "lean":
                return ScaleProject.apply(x, self.S, self.U, self.bias, self.spatial_dims, self._project)
            return ScaleProject.apply(self._project(x), self.S, self.U, self.bias, self.spatial_dims, None)
        return self._apply_weight(x, self.effective_weight().to(self.base_weight.dtype))

    def _apply_weight(self, x: Tensor, weight: Tensor, bias: bool = True) -> Tensor:
        raise NotImplementedError

    def _project(self, x: Tensor) -> Tensor:
        """The first of the three ops: ``x`` through ``Vh`` (a conv with ``R`` output channels per group)."""
        return self._apply_weight(x, self._from_matrices(self.Vh), bias=False)

    # ----------------------------------------------------------------------------------------- plain
    def to_plain(self, merge: bool = True) -> nn.Module:
        """A plain layer of the original class: fine-tuned weight (``merge``) or the original one."""
        plain = copy.copy(self._skeleton)
        plain._parameters = dict(self._skeleton._parameters)
        weight_grad, bias_grad = self._base_requires_grad
        if merge:
            weight = nn.Parameter(self.merged_weight(), requires_grad=weight_grad)
        else:
            weight = self.base_weight.requires_grad_(weight_grad)
        plain.weight = weight
        plain.bias = self.bias.requires_grad_(bias_grad) if self.bias is not None else None
        plain.train(self.training)
        return plain

    def extra_repr(self) -> str:
        """Shown in the layer's repr: weight shape, groups, rank, trained factors and form."""
        shape = "x".join(map(str, self.base_weight.shape))
        return f"weight={shape}, groups={self.groups}, rank={self.rank}, train={self.train_factors}, form={self.form}"


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in HALF_DTYPES else dtype


class SVFLinear(SVFLayer):
    """SVF version of ``torch.nn.Linear`` (one group, rank ``min(out_features, in_features)``)."""

    base_type = nn.Linear
    kind = "Linear"
    spatial_dims = 0

    def _copy_geometry(self, base: nn.Module) -> None:
        self.in_features, self.out_features = base.in_features, base.out_features

    def _output_positions(self, x: Tensor) -> int:
        return x.numel() // max(self.in_features, 1)

    def _apply_weight(self, x: Tensor, weight: Tensor, bias: bool = True) -> Tensor:
        return F.linear(x, weight.reshape(weight.shape[0], -1), self.bias if bias else None)


class _SVFConvNd(SVFLayer):
    def _copy_geometry(self, base: nn.Module) -> None:
        for attr in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "padding_mode"):
            setattr(self, attr, getattr(base, attr))
        self._reversed_padding_repeated_twice = base._reversed_padding_repeated_twice

    def _output_positions(self, x: Tensor) -> int:
        spatial = x.shape[-self.spatial_dims :]
        batch = x.numel() // max(math.prod(spatial) * self.in_channels, 1)
        return batch * math.prod(math.ceil(n / s) for n, s in zip(spatial, self.stride, strict=True))

    def _apply_weight(self, x: Tensor, weight: Tensor, bias: bool = True) -> Tensor:
        padding = self.padding
        if self.padding_mode != "zeros":
            x = F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            padding = 0
        conv = CONV[self.spatial_dims]
        return conv(x, weight, self.bias if bias else None, self.stride, padding, self.dilation, self.groups)


class SVFConv1d(_SVFConvNd):
    """SVF version of ``torch.nn.Conv1d``, decomposed per group."""

    base_type = nn.Conv1d
    kind = "Conv1d"
    spatial_dims = 1


class SVFConv2d(_SVFConvNd):
    """SVF version of ``torch.nn.Conv2d``, decomposed per group (depthwise: one value per channel)."""

    base_type = nn.Conv2d
    kind = "Conv2d"
    spatial_dims = 2


class SVFConv3d(_SVFConvNd):
    """SVF version of ``torch.nn.Conv3d``, decomposed per group."""

    base_type = nn.Conv3d
    kind = "Conv3d"
    spatial_dims = 3


def _transformers_conv1d() -> type[nn.Module] | None:
    """transformers' ``Conv1D`` class when transformers is loaded; never imports it (a model holding one has)."""
    cls = getattr(sys.modules.get("transformers.pytorch_utils"), "Conv1D", None)
    return cls if isinstance(cls, type) and issubclass(cls, nn.Module) else None


class SVFConv1D(SVFLayer):
    """SVF version of Hugging Face transformers' ``Conv1D`` (GPT-2, GPT-J-style models): a Linear whose weight
    is stored transposed, ``(in_features, out_features)``.

    It is decomposed as the ``(out, in)`` matrix a Linear holds, so it trains exactly what ``SVFLinear`` would;
    its forward is Conv1D's own (``addmm`` with the stored weight), so an untouched layer is bit-identical.
    svftune does not depend on transformers: the class is found in the already loaded ``transformers`` module.
    """

    base_type = None
    kind = "Conv1D"
    spatial_dims = 0

    @classmethod
    def plain_class(cls) -> type[nn.Module] | None:
        """transformers' ``Conv1D`` (``None`` while transformers is not imported)."""
        plain = _transformers_conv1d()
        if plain is not None:
            cls.base_type = plain  # for code reading base_type: set whenever a Conv1D can exist
        return plain

    def _copy_geometry(self, base: nn.Module) -> None:
        self.nf, self.nx = base.nf, base.nx
        self.in_features, self.out_features = base.nx, base.nf

    def _matrices(self, weight: Tensor) -> Tensor:
        return weight.mT.unsqueeze(0)

    def _from_matrices(self, matrices: Tensor) -> Tensor:
        return matrices.reshape(-1, matrices.shape[-1]).mT

    def _output_positions(self, x: Tensor) -> int:
        return x.numel() // max(self.in_features, 1)

    def _apply_weight(self, x: Tensor, weight: Tensor, bias: bool = True) -> Tensor:
        flat = x.view(-1, x.size(-1))  # Conv1D.forward, operation for operation
        out = torch.addmm(self.bias, flat, weight) if bias and self.bias is not None else flat @ weight
        return out.view(*x.shape[:-1], weight.shape[-1])


@dataclass(frozen=True)
class LayerKind:
    """One supported layer type: which plain class it is, and the SVF layer that replaces it.

    Attributes:
        name: the kind's name, as checkpoints record it (``"Linear"``, ``"Conv2d"``, ``"Conv1D"``...).
        svf_class: the SVF layer class (``SVFLinear``...).
        weight_dims: dimensions of the plain layer's weight.
        transposed: the weight is stored ``(in, out)`` (transformers' Conv1D) instead of ``(out, in, ...)``.
    """

    name: str
    svf_class: type[SVFLayer]
    weight_dims: int
    transposed: bool = False

    def plain_class(self) -> type[nn.Module] | None:
        """The plain class, or ``None`` when its library (transformers) is not loaded."""
        return self.svf_class.plain_class()

    def matches(self, module: nn.Module) -> bool:
        """Whether ``module`` is an instance of the plain class (subclasses included)."""
        plain = self.plain_class()
        return plain is not None and isinstance(module, plain)

    def matrix_shape(self, shape: tuple[int, ...] | list[int], groups: int = 1) -> tuple[int, int]:
        """``(out/groups, fan_in)`` of each group's matrix for a weight of this shape."""
        if self.transposed:
            return shape[1], shape[0]
        return shape[0] // groups, math.prod(shape[1:])


LAYER_KINDS: dict[str, LayerKind] = {
    kind.name: kind
    for kind in (
        LayerKind("Linear", SVFLinear, 2),
        LayerKind("Conv1d", SVFConv1d, 3),
        LayerKind("Conv2d", SVFConv2d, 4),
        LayerKind("Conv3d", SVFConv3d, 5),
        LayerKind("Conv1D", SVFConv1D, 2, transposed=True),
    )
}
"""Every layer type SVF adapts, by kind name: the one registry that layer selection, the SVF layers and
checkpoints use. ``Conv1D`` is Hugging Face transformers' transposed Linear (found only when transformers is
loaded; svftune does not import it)."""


def layer_kind(module: nn.Module) -> LayerKind | None:
    """The ``LAYER_KINDS`` entry whose plain class ``module`` is an instance of, or ``None``.

    Args:
        module: any module (SVF layers are not plain layers: ``None``).

    Returns:
        The kind, or ``None``.

    Examples:
        >>> from torch import nn
        >>> from svftune.layers import layer_kind
        >>> layer_kind(nn.Conv2d(3, 8, 3)).name, layer_kind(nn.ReLU())
        ('Conv2d', None)
    """
    if isinstance(module, SVFLayer):
        return None
    for kind in LAYER_KINDS.values():
        if kind.matches(module):
            return kind
    return None


def plain_classes() -> tuple[type[nn.Module], ...]:
    """The plain classes of every ``LAYER_KINDS`` entry whose library is loaded (for ``isinstance`` checks)."""
    return tuple(cls for kind in LAYER_KINDS.values() if (cls := kind.plain_class()) is not None)
