"""The committed format-1 checkpoint keeps loading and keeps giving the outputs it was saved with."""

from __future__ import annotations

import safetensors.torch
from fixtures.svf_models import rel_error
from fixtures.svf_v1 import BASE, CHECKPOINT, EXPECTED, fixture_model

import svftune


def test_format_v1_fixture_still_loads_and_reproduces():
    model = fixture_model()
    model.load_state_dict(safetensors.torch.load_file(BASE))
    checkpoint = svftune.read_svf(CHECKPOINT)
    assert checkpoint.metadata["format_version"] == 1
    assert any(tie[3] == "basis" for entry in checkpoint.layers.values() for tie in entry.ties)
    svftune.load_svf(model.eval(), CHECKPOINT)
    expected = safetensors.torch.load_file(EXPECTED)
    assert rel_error(model(expected["inputs"]), expected["outputs"]) <= 1e-5
