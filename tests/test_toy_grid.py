"""Every toy layer kind through the same checks (PEFT-style grid).

Tolerances: float64 runs compare at relative 1e-12; fp32 at relative 1e-6 for the three-op training form
(U diag(S) Vh is not bit-exact in fp32) and bit-identical wherever the layer is exact by construction. The checks
shared with the other grids (and the one relative error) live in checks.py.
"""

from __future__ import annotations

import copy

import pytest
import torch
from checks import (
    check_eval_exact_at_init,
    check_merge,
    check_only_s_trains,
    check_train_close,
    check_unapply,
    reference_weight,
    relative_error,
)
from torch import nn
from torch.func import functional_call
from toys import TOYS, build_toy, perturb_singular_values

import svftune
from svftune.constants import FACTOR_OF_LETTER

TOY_NAMES = sorted(TOYS)
FORMS = ("three_op", "rebuilt", "lean")


@pytest.mark.parametrize("name", TOY_NAMES)
def test_decomposition_is_exact_full_rank(name):
    model, _ = build_toy(name, torch.float64)
    original = copy.deepcopy(model)
    svftune.apply_svf(model)
    for layer_name, layer in svftune.svf_layers(model):
        weight = original.get_submodule(layer_name).weight
        groups = layer.groups
        fan_in = weight[0].numel()
        out_per_group = weight.shape[0] // groups
        assert layer.U.shape == (groups, out_per_group, min(out_per_group, fan_in))
        assert layer.rank == min(out_per_group, fan_in)
        rebuilt = torch.einsum("gor,gr,grn->gon", layer.U, layer.S, layer.Vh).reshape(weight.shape)
        assert relative_error(rebuilt, weight) < 1e-13
        eye = torch.eye(layer.rank, dtype=torch.float64).expand(groups, -1, -1)
        assert torch.allclose(layer.U.mT @ layer.U, eye, atol=1e-12)
        assert torch.allclose(layer.Vh @ layer.Vh.mT, eye, atol=1e-12)
        assert (layer.S[..., :-1] >= layer.S[..., 1:]).all()


@pytest.mark.parametrize("name", TOY_NAMES)
def test_init_eval_bit_identical_and_train_close(name):
    model, x = build_toy(name)
    reference = copy.deepcopy(model)
    svftune.freeze_batchnorm(reference)
    for form in FORMS:
        adapted = svftune.apply_svf(copy.deepcopy(model), form=form)
        expected = check_eval_exact_at_init(model, adapted, x)
        out = check_train_close(adapted, reference, x, rtol=1e-6)
        assert torch.equal(out, expected) or form in ("three_op", "lean"), "rebuilt form: exactly W at init"


@pytest.mark.parametrize("name", TOY_NAMES)
@pytest.mark.parametrize("form", FORMS)
def test_forms_match_independent_reference_float64(name, form):
    """Outputs and S-gradients of each form equal autograd through W(S) = W + U diag(S - S0) Vh."""
    model, x = build_toy(name, torch.float64)
    original = copy.deepcopy(model)
    svftune.freeze_batchnorm(original)
    adapted = svftune.apply_svf(model, form=form)
    perturb_singular_values(adapted)
    adapted.train()
    x = x.clone().requires_grad_(True)
    out = adapted(x)
    target = torch.randn_like(out)
    (out * target).sum().backward()

    layers = svftune.svf_layers(adapted)
    leaves = {name: layer.S.detach().clone().requires_grad_(True) for name, layer in layers}
    params = {}
    for layer_name, layer in layers:
        s = leaves[layer_name]
        base = layer.base_weight.reshape(layer.U.shape[0], layer.U.shape[1], -1)
        w = base + torch.einsum("gor,gr,grn->gon", layer.U, s - layer.S0, layer.Vh)
        params[f"{layer_name}.weight"] = w.reshape(layer.base_weight.shape)
    x_ref = x.detach().clone().requires_grad_(True)
    expected = functional_call(original.train(), params, (x_ref,))
    (expected * target).sum().backward()

    assert relative_error(out, expected) < 1e-12
    assert relative_error(x.grad, x_ref.grad) < 1e-12
    for layer_name, layer in layers:
        assert relative_error(layer.S.grad, leaves[layer_name].grad) < 1e-10, layer_name


@pytest.mark.parametrize("name", TOY_NAMES)
def test_sgd_changes_only_singular_values(name):
    model, x = build_toy(name)
    svftune.apply_svf(model)
    check_only_s_trains(model, lambda m, step: m(x).square().mean(), steps=3, lr=0.05, clip=1e6)


@pytest.mark.parametrize("name", TOY_NAMES)
def test_merge_equals_unmerged_and_unapply_restores(name):
    model, x = build_toy(name)
    next(model.parameters()).requires_grad_(False)  # mixed flags, so that restoring them is not vacuous
    adapted = svftune.apply_svf(model, inplace=False)
    perturb_singular_values(adapted)
    adapted.eval()
    for layer_name, layer in svftune.svf_layers(adapted):
        assert relative_error(layer.weight, reference_weight(layer)) < 1e-6, layer_name
    check_merge(adapted, model, x, rtol=1e-5)
    check_unapply(adapted, model, x)


@pytest.mark.parametrize("name", ["conv2d_3x3", "conv2d_grouped", "mlp"])
@pytest.mark.parametrize("train", ["U", "V", "US", "SV", "USV"])
def test_table7_ablations_train_only_the_chosen_factors(name, train):
    model, x = build_toy(name)
    expected = copy.deepcopy(model).eval()(x)
    svftune.apply_svf(model, train=train)
    assert relative_error(model.eval()(x), expected) <= 1e-6
    wanted = {f"{n}.{FACTOR_OF_LETTER[c]}" for n, _ in svftune.svf_layers(model) for c in train}
    assert {n for n, p in model.named_parameters() if p.requires_grad} == wanted
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    model.train()
    loss = model(x).square().mean()
    loss.backward()
    optimizer.step()
    changed = {k for k, v in model.state_dict().items() if not torch.equal(before[k], v)}
    assert changed and changed <= wanted
    model.eval()
    with torch.no_grad():
        unmerged = model(x)
        for _, layer in svftune.svf_layers(model):
            assert relative_error(layer.weight, reference_weight(layer)) < 1e-6
        assert relative_error(svftune.merge_svf(model)(x), unmerged) <= 1e-5


def test_paper_counts_resnet50_layers_2_to_4():
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.resnet50()
    svftune.apply_svf(model, layers=["layer2", "layer3", "layer4"])
    trainable, total = svftune.trainable_parameters(model)
    assert trainable == 12_544
    assert total == sum(p.numel() for p in torchvision.models.resnet50().parameters()) + 12_544
    per_stage = {
        stage: sum(layer.S.numel() for n, layer in svftune.svf_layers(model) if n.startswith(stage))
        for stage in ("layer2", "layer3", "layer4")
    }
    assert per_stage == {"layer2": 1_792, "layer3": 5_120, "layer4": 5_632}


def test_trainable_parameters_counts_u_and_v_only_when_trained():
    model = nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 2))
    plain_total = sum(p.numel() for p in model.parameters())
    svftune.apply_svf(copy.deepcopy(model))
    assert svftune.trainable_parameters(svftune.apply_svf(copy.deepcopy(model))) == (4 + 2, plain_total + 6)
    with_u = svftune.apply_svf(copy.deepcopy(model), train="US")
    assert svftune.trainable_parameters(with_u) == (6 + 4 * 4 + 2 * 2, plain_total + 6 + 4 * 4 + 2 * 2)
