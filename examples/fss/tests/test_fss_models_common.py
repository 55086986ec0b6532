"""Building blocks against independent reference computations, BAM's helpers, and the PSPNet base learner."""

from __future__ import annotations

import itertools

import pytest
import torch
from svf_fss.models import PSPNet, build_backbone, build_model, build_pspnet, load_pspnet_weights
from svf_fss.models.bam import base_foreground, kshot_weights
from svf_fss.models.common import ASPP, gram_distance, masked_average_pooling, prior_mask
from svf_fss.models.pfenet import bin_size
from svf_fss.models.weights import BackboneWeightsError

pytestmark = pytest.mark.usefixtures("one_thread")


def test_masked_average_pooling():
    features = torch.randn(2, 3, 4, 5)
    mask = torch.zeros(2, 1, 4, 5)
    mask[0, 0, 1, 1:4] = 1
    expected = features[0, :, 1, 1:4].sum(dim=1) / (3 + 5e-4)
    result = masked_average_pooling(features, mask)
    assert result.shape == (2, 3, 1, 1)
    torch.testing.assert_close(result[0, :, 0, 0], expected)
    assert torch.equal(result[1], torch.zeros(3, 1, 1))  # empty mask: zero prototype, no NaN


def reference_prior(query, support, mask):
    """Loops over pixels: max over support pixels of s.q / (|s||q| + 1e-7) on masked support features."""
    _, channels, height, width = query.shape
    s = (support * mask)[0].reshape(channels, -1)
    values = torch.empty(height * width, dtype=torch.float64)
    for i, q in enumerate(query[0].reshape(channels, -1).T.double()):
        values[i] = max(float(q @ sj / (q.norm() * sj.norm() + 1e-7)) for sj in s.T.double())
    values = (values - values.min()) / (values.max() - values.min() + 1e-7)
    return values.reshape(1, 1, height, width)


def test_prior_mask_against_loops_and_the_mask():
    torch.manual_seed(0)
    query = torch.randn(1, 6, 3, 4)
    support = torch.randn(1, 6, 3, 3)
    support[0, :, 0, 0] = 3 * query[0, :, 2, 1]  # a foreground support pixel parallel to query pixel (2, 1)
    support[0, :, 2, 2] = query[0, :, 0, 0]  # a BACKGROUND support pixel equal to query pixel (0, 0)
    mask = torch.zeros(1, 1, 3, 3)
    mask[0, 0, :2, :2] = 1
    prior = prior_mask(query, support, mask)
    torch.testing.assert_close(prior.double(), reference_prior(query, support, mask), rtol=1e-5, atol=1e-5)
    assert prior[0, 0, 2, 1] == prior.max() and prior.max() > 0.999 and prior.min() == 0
    assert prior[0, 0, 0, 0] < 0.999  # the background twin does not count


def test_prior_mask_stays_float32_under_autocast():
    torch.manual_seed(0)
    query, support, mask = torch.randn(2, 8, 5, 5), torch.randn(2, 8, 5, 5), (torch.rand(2, 1, 5, 5) > 0.5).float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        prior = prior_mask(query.bfloat16(), support, mask)
    assert prior.dtype == torch.float32
    torch.testing.assert_close(prior, prior_mask(query.bfloat16().float(), support, mask))


def test_gram_distance_against_its_formula():
    torch.manual_seed(0)
    a, b = torch.randn(2, 5, 3, 4), torch.randn(2, 5, 3, 4)
    assert torch.equal(gram_distance(a, a), torch.zeros(2))
    for i in range(2):
        fa, fb = a[i].reshape(5, -1).double(), b[i].reshape(5, -1).double()
        ga = torch.tensor([[float(x @ y / (x.norm() * y.norm() + 1e-7)) for y in fa] for x in fa])
        gb = torch.tensor([[float(x @ y / (x.norm() * y.norm() + 1e-7)) for y in fb] for x in fb])
        expected = (ga - gb).norm() / 5
        torch.testing.assert_close(gram_distance(a, b)[i].double(), expected.double(), rtol=1e-5, atol=1e-6)


def test_aspp_and_bins():
    aspp = ASPP(8)
    assert aspp(torch.randn(1, 8, 7, 9)).shape == (1, 40, 7, 9)
    assert [m.dilation for m in aspp.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3)] == [
        (6, 6),
        (12, 12),
        (18, 18),
    ]
    assert bin_size(60, (9, 11)) == (60, 60)
    assert bin_size(0.5, (9, 11)) == (4, 5)
    assert bin_size(0.125, (5, 5)) == (1, 1)


def test_kshot_weights_follow_their_shots():
    torch.manual_seed(0)
    reweight = torch.nn.Sequential(torch.nn.Conv2d(4, 2, 1), torch.nn.ReLU(), torch.nn.Conv2d(2, 4, 1))
    distances = torch.rand(3, 4)
    weights = kshot_weights(distances, reweight)
    torch.testing.assert_close(weights.sum(dim=1), torch.ones(3))
    for permutation in itertools.islice(itertools.permutations(range(4)), 6):
        index = torch.tensor(permutation)
        torch.testing.assert_close(kshot_weights(distances[:, index], reweight), weights[:, index])
    assert torch.equal(kshot_weights(distances[:, :1], None), torch.ones(3, 1))


def test_base_foreground_excludes_background_and_the_episode_class():
    probabilities = torch.tensor([0.1, 0.2, 0.3, 0.4]).reshape(1, 4, 1, 1).repeat(2, 1, 1, 1)
    torch.testing.assert_close(base_foreground(probabilities, None).flatten(), torch.tensor([0.9, 0.9]))
    torch.testing.assert_close(base_foreground(probabilities, torch.tensor([1, 3])).flatten(), torch.tensor([0.7, 0.5]))


def test_pspnet_trains_and_loads_bam_checkpoints(tmp_path):
    torch.manual_seed(0)
    pspnet = build_pspnet("mobilenet_v2", "pascal")
    assert pspnet.classes == 16 and build_pspnet("mobilenet_v2", "coco").classes == 61
    image, label = torch.randn(2, 3, 41, 49), torch.randint(0, 16, (2, 41, 49))
    out = pspnet.train()(image, label)
    out["loss"].backward()
    assert out["logits"].shape == (2, 16, 41, 49)
    assert all(p.grad is not None for p in pspnet.parameters())  # stage 1 trains everything
    assert [g["lr_scale"] for g in pspnet.param_groups()] == [1.0, 0.1]

    # BAM's layout: layerN + ppm + cls at the top level, encoder.N aliases, DataParallel prefix, wrapped
    public = {}
    for key, value in pspnet.state_dict().items():
        key = key.removeprefix("backbone.").removeprefix("head.")
        public["module." + key] = value
        if key.startswith("layer"):
            public["module.encoder." + key[len("layer") :]] = value
    path = tmp_path / "best.pth"
    torch.save({"epoch": 99, "state_dict": public}, path)
    fresh = PSPNet(build_backbone("mobilenet_v2"), classes=16)
    load_pspnet_weights(fresh, path)
    assert all(
        torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), pspnet.state_dict().values(), strict=True)
    )

    model = build_model("bam", "mobilenet_v2", 1, "svf", base_learner=path)
    assert torch.equal(model.base_head.cls[4].weight, pspnet.head.cls[4].weight)
    assert torch.equal(model.base_backbone.layer4[0].conv[0][0].weight, pspnet.backbone.layer4[0].conv[0][0].weight)
    assert torch.equal(model.backbone.layer1[0].conv[0][0].weight, pspnet.backbone.layer1[0].conv[0][0].weight)
    with pytest.raises(BackboneWeightsError, match="Pascal 16, COCO 61"):
        build_model("bam", "mobilenet_v2", 1, "frozen", dataset="coco", base_learner=path)
