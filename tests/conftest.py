import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))


def pytest_collection_modifyitems(config, items):
    """Skip ``@pytest.mark.cuda`` tests where PyTorch sees no CUDA device (``python -m pytest -m cuda`` runs them)."""
    cuda_items = [item for item in items if item.get_closest_marker("cuda") is not None]
    if not cuda_items:
        return
    import pytest
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU: run `python -m pytest -m cuda` on a machine with one")
    for item in cuda_items:
        item.add_marker(skip)
