"""The checks every model grid runs on an adapted model (toys, torchvision, transformers, timm), written once.

One definition of the relative error: ``||actual - expected|| / ||expected||`` (Frobenius), computed in float64.
References are float64: ``reference_weight`` rebuilds an SVF layer's weight from its stored tensors independently of
the layer's own code.

The five checks:

1. ``check_eval_exact_at_init``: eval/no-grad outputs bit-identical to the original model while ``S == S0``.
2. ``check_train_close``: train-mode outputs within a relative tolerance of a reference model.
3. ``check_only_s_trains``: optimizer steps change the singular values and nothing else (bit for bit), or only
   those and the parameters named in ``also_trains`` (a head in ``modules_to_save``).
4. ``check_merge``: ``merge_svf`` gives plain layers of the original classes, weights rebuilt in float64 and rounded
   once, outputs within a relative tolerance of the unmerged model, ``requires_grad`` flags restored.
5. ``check_unapply``: ``unapply_svf`` restores every original tensor bit for bit, the classes and the flags.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Collection

import torch
from torch import Tensor, nn

import svftune
from svftune.layers import SVFLayer


def relative_error(actual: Tensor, expected: Tensor) -> float:
    """``||actual - expected|| / ||expected||`` (Frobenius) in float64."""
    expected = expected.detach().double()
    return ((actual.detach().double() - expected).norm() / expected.norm()).item()


def reference_weight(layer: SVFLayer) -> Tensor:
    """The weight an SVF layer should apply, in float64, written independently of the layer's own code."""
    u, s, vh = layer.U.double(), layer.S.double(), layer.Vh.double()
    if layer.residual is not None:
        matrices = layer.residual.double() + torch.einsum("gor,gr,grn->gon", u, s, vh)
    else:
        matrices = torch.einsum("gor,gr,grn->gon", u, s - layer.S0.double(), vh)
    if layer.kind == "Conv1D":  # transformers' Conv1D stores the (out, in) matrix transposed
        matrices = matrices[0].mT
    matrices = matrices.reshape(layer.base_weight.shape)
    return matrices if layer.residual is not None else layer.base_weight.double() + matrices


def requires_grad_flags(model: nn.Module) -> dict[str, bool]:
    """``requires_grad`` of every parameter by name."""
    return {name: p.requires_grad for name, p in model.named_parameters()}


def module_classes(model: nn.Module) -> dict[str, type]:
    """The class of every module by name."""
    return {name: type(m) for name, m in model.named_modules()}


def _run(model: nn.Module, inputs) -> Tensor:
    out = model(**inputs) if isinstance(inputs, dict) else model(inputs)
    return getattr(out, "logits", out)


def check_eval_exact_at_init(original: nn.Module, adapted: nn.Module, inputs) -> Tensor:
    """Check 1: eval-mode, no-grad outputs of ``adapted`` equal ``original``'s bit for bit; returns them."""
    original.eval()
    adapted.eval()
    with torch.no_grad():
        expected = _run(original, inputs)
        out = _run(adapted, inputs)
    assert torch.isfinite(expected).all() and expected.abs().max() > 0
    assert torch.equal(out, expected), f"eval output differs at init by {relative_error(out, expected):.2e}"
    return out


def check_train_close(adapted: nn.Module, reference: nn.Module, inputs, rtol: float, seed: int = 1234) -> Tensor:
    """Check 2: train-mode outputs within ``rtol`` (relative) of ``reference`` under the same RNG seed."""
    torch.manual_seed(seed)  # dropout and stochastic depth draw the same masks in both models
    out = _run(adapted.train(), inputs)
    torch.manual_seed(seed)
    expected = _run(reference.train(), inputs)
    error = relative_error(out, expected)
    assert error <= rtol, f"train-mode relative error {error:.2e} > {rtol:.0e}"
    return out


def check_only_s_trains(
    model: nn.Module,
    loss_fn: Callable[[nn.Module, int], Tensor],
    steps: int = 3,
    lr: float = 1e-2,
    clip: float = 1.0,
    also_trains: Collection[str] = (),
) -> None:
    """Check 3: ``steps`` SGD steps on ``loss_fn(model, step)`` change every layer's ``S`` and nothing else.

    ``also_trains``: names of the other parameters that ``apply_svf`` leaves trainable (``modules_to_save``, a new
    head); they must have gradients and are allowed to change."""
    s_names = {f"{name}.S" for name, _ in svftune.svf_layers(model)} | set(also_trains)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == s_names
    before = {key: value.clone() for key, value in model.state_dict().items()}
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(parameters, lr=lr, momentum=0.9)
    model.train()
    for step in range(steps):
        loss = loss_fn(model, step)
        assert torch.isfinite(loss)
        optimizer.zero_grad()
        loss.backward()
        for name, p in model.named_parameters():
            # S gradients are not checked nonzero: stochastic depth may drop a whole branch for the batch
            assert (p.grad is not None and torch.isfinite(p.grad).all()) if name in s_names else p.grad is None, name
        torch.nn.utils.clip_grad_norm_(parameters, clip)  # random-weight nets amplify gradients
        optimizer.step()
    after = model.state_dict()
    assert after.keys() == before.keys()
    for key, value in before.items():
        if key not in s_names:
            assert torch.equal(after[key], value), f"{key} changed although only S trains"
    changed = [key for key in s_names if not torch.equal(after[key], before[key])]
    assert len(changed) >= max(1, len(s_names) // 2), f"only {len(changed)} of {len(s_names)} S tensors moved"


def check_merge(adapted: nn.Module, original: nn.Module, inputs, rtol: float) -> nn.Module:
    """Check 4: merge a copy of ``adapted`` (S moved off S0) and compare it with ``adapted`` and ``original``."""
    adapted = copy.deepcopy(adapted).eval()
    with torch.no_grad():
        unmerged = _run(adapted, inputs)
    exact = {name: reference_weight(layer) for name, layer in svftune.svf_layers(adapted)}
    merged = svftune.merge_svf(adapted)
    assert not any(isinstance(m, SVFLayer) for m in merged.modules())
    assert module_classes(merged) == module_classes(original)
    assert requires_grad_flags(merged) == requires_grad_flags(original)
    assert merged.state_dict().keys() == original.state_dict().keys()
    for name, expected in exact.items():
        weight = merged.get_submodule(name).weight
        assert weight.dtype == original.get_submodule(name).weight.dtype
        # rebuilt in float64 and rounded once: within half an ulp of the exact weight
        ulp = torch.finfo(weight.dtype).eps / 2
        bound = ulp * expected.abs() + 1e-12 * expected.abs().max()
        assert ((weight.double() - expected).abs() <= bound).all(), f"{name}: merged weight not rounded once"
    with torch.no_grad():
        out = _run(merged.eval(), inputs)
    error = relative_error(out, unmerged)
    assert error <= rtol, f"merged vs unmerged relative error {error:.2e} > {rtol:.0e}"
    merged.train()  # norm layers follow train() again once SVF is gone
    assert all(m.training for m in merged.modules())
    return merged


def check_unapply(adapted: nn.Module, original: nn.Module, inputs) -> nn.Module:
    """Check 5: ``unapply_svf`` on a copy of ``adapted`` gives ``original`` back bit for bit."""
    restored = svftune.unapply_svf(copy.deepcopy(adapted))
    assert module_classes(restored) == module_classes(original)
    assert requires_grad_flags(restored) == requires_grad_flags(original)
    assert not hasattr(restored, "svf_config")
    state, expected = restored.state_dict(), original.state_dict()
    assert state.keys() == expected.keys()
    for key, value in expected.items():
        assert state[key].dtype == value.dtype and torch.equal(state[key], value), key
    with torch.no_grad():
        assert torch.equal(_run(restored.eval(), inputs), _run(original.eval(), inputs))
    restored.train()
    assert all(m.training for m in restored.modules())
    return restored


def random_images(size: int, seed: int, batch: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """``(batch, 3, size, size)`` standard-normal images, the same for the same seed on every machine."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, size, size, generator=generator).to(dtype)


def make_nontrivial(model: nn.Module, size: int) -> None:
    """Random values for constant-initialised parameters (zero biases, ViT's class token, zero-initialised last
    BatchNorm of ResNet blocks: normal(0, 0.1); unit norm scales, ConvNeXt's 1e-6 layer scales: uniform(0.5, 1.5)),
    then BatchNorm running statistics (timm's BatchNormAct2d too) from three random batches; leaves eval mode."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.min() != parameter.max():
                continue
            fresh = torch.empty(parameter.shape)
            if parameter.flatten()[0] == 0:
                fresh.normal_(0.0, 0.1, generator=generator)
            else:
                fresh.uniform_(0.5, 1.5, generator=generator)
            parameter.copy_(fresh)
        norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        momenta = [m.momentum for m in norms]
        for module in norms:
            module.momentum = None  # cumulative average: the stats match the data the model sees
        model.train()
        for seed in range(3):
            model(random_images(size, 100 + seed, batch=4))
        for module, momentum in zip(norms, momenta, strict=True):
            module.momentum = momentum
    model.eval()
