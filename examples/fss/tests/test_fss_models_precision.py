"""Mixed precision (autocast bfloat16 on the CPU) and activation checkpointing of backbone stages."""

from __future__ import annotations

import copy

import pytest
import torch
from svf_fss.models import PSPNet, build_backbone, build_model
from svf_fss.models.strategies import apply_strategy

import svftune

BINS = (1.0, 0.5, 0.25, 0.125)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def svf_backbone():
    torch.manual_seed(0)
    backbone = build_backbone("mobilenet_v2", weights="offline" if _has_real_weights() else None)
    apply_strategy(backbone, "svf")
    return backbone


def _has_real_weights() -> bool:
    from svf_fss.models.backbones import offline_mobilenet_v2_weights

    return offline_mobilenet_v2_weights() is not None


def batch(shots=1):
    generator = torch.Generator().manual_seed(0)
    query = torch.randn(2, 3, 49, 57, generator=generator)
    supports = torch.randn(2, shots, 3, 49, 57, generator=generator)
    masks = torch.zeros(2, shots, 49, 57, dtype=torch.long)
    masks[..., 8:30, 10:40] = 1
    query_mask = (torch.rand(2, 49, 57, generator=generator) > 0.5).long()
    return query, supports, masks, query_mask


def singular_value_grads(model):
    return {name: layer.S.grad.clone() for name, layer in svftune.svf_layers(model.backbone)}


@pytest.mark.parametrize(("method", "shots"), [("baseline", 1), ("pfenet", 1), ("bam", 5)])
def test_autocast_bfloat16_forward_backward(method, shots, svf_backbone):
    torch.manual_seed(0)
    model = build_model(method, copy.deepcopy(svf_backbone), shots, None, pyramid_bins=BINS)
    if method == "bam":
        model.base_backbone = copy.deepcopy(svf_backbone)  # any frozen backbone will do for this test
        svftune.unapply_svf(model.base_backbone)
    query, supports, masks, query_mask = batch(shots)
    model.train()
    torch.manual_seed(1)
    reference = model(query, supports, masks, query_mask)
    torch.manual_seed(1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(query, supports, masks, query_mask)
    assert out["logits"].dtype == torch.bfloat16  # autocast did run the convs in bfloat16
    assert out["loss"].dtype == torch.float32 and torch.isfinite(out["loss"])
    assert abs(out["loss"].item() - reference["loss"].item()) < 0.05
    out["loss"].backward()
    grads = singular_value_grads(model)
    assert grads and all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads.values())
    assert any(g.abs().sum() > 0 for g in grads.values())


def count_calls(module):
    calls = []
    module.register_forward_hook(lambda *args: calls.append(1))
    return calls


def test_checkpointing_recomputes_only_trained_stages_and_gives_the_same_gradients(svf_backbone):
    results = []
    for checkpoint in (False, True):
        torch.manual_seed(0)
        model = build_model("baseline", copy.deepcopy(svf_backbone), 1, None, checkpoint_backbone=checkpoint)
        calls = {name: count_calls(getattr(model.backbone, name)[0]) for name in ("layer1", "layer3")}
        model.train()
        torch.manual_seed(1)
        out = model(*batch())
        out["loss"].backward()
        results.append((out["loss"].detach(), singular_value_grads(model), {k: len(v) for k, v in calls.items()}))
    (loss0, grads0, calls0), (loss1, grads1, calls1) = results
    assert calls0 == {"layer1": 1, "layer3": 1}
    assert calls1 == {"layer1": 1, "layer3": 2}  # layer1 is frozen: no recomputation; layer3 trains: recomputed
    assert torch.equal(loss0, loss1)
    for name in grads0:
        torch.testing.assert_close(grads1[name], grads0[name], rtol=1e-5, atol=1e-7)


def test_checkpointing_skips_stages_with_batchnorm_in_training_mode():
    """PSPNet stage 1 trains BatchNorm: recomputing would update its running statistics twice."""
    model = PSPNet(build_backbone("mobilenet_v2"), classes=4).train()
    model.backbone.checkpoint_stages = True
    calls = count_calls(model.backbone.layer3[0])
    model(torch.randn(2, 3, 33, 33), torch.randint(0, 4, (2, 33, 33)))["loss"].backward()
    assert len(calls) == 1
