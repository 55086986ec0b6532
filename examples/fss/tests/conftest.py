"""Shared fixtures for the svf-fss tests: the offline mini benchmark, generated once per session."""

from __future__ import annotations

import os

import pytest
from svf_fss.data.errors import DataError


@pytest.fixture(scope="session")
def mini_root(tmp_path_factory):
    """The default mini benchmark (320 train / 160 val images, seed 0) in a session temp folder."""
    from svf_fss.data.mini import load_fashion, make_mini

    try:
        load_fashion()
    except DataError as e:
        if os.environ.get("CI"):  # .ci/setup.sh installs it: in CI a missing source is a failure, not a skip
            raise
        pytest.skip(f"mini benchmark source missing: {e}")
    root = tmp_path_factory.mktemp("mini")
    make_mini(root)
    return root


@pytest.fixture
def single_thread():
    """Run a test with one intra-op thread (as in a DataLoader worker), restoring the setting afterwards.

    The data tests use it: small ops spread over threads only add scheduling overhead on a busy 2-core box."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a whole test module: LAPACK's SVD and small convs crawl when two OpenMP threads
    fight other processes for two cores (the model tests opt in with ``pytestmark``)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
