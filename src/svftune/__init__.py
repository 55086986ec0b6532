"""svftune: Singular Value Fine-tuning (SVF) for any PyTorch backbone.

Decompose each selected Conv/Linear weight as ``W = U diag(S) Vh``, freeze ``U`` and ``Vh`` and train only ``S``:

    import svftune
    model = svftune.apply_svf(backbone, layers=["layer2", "layer3", "layer4"])
    svftune.print_trainable_parameters(model)
    ...  # train
    plain = svftune.merge_svf(model)

Everything most code needs is importable from here: applying, merging and removing SVF (``apply_svf``,
``merge_svf``, ``unapply_svf``), counting and freezing (``trainable_parameters``, ``freeze_batchnorm``), the layers
(``SVFLinear``, ``SVFConv2d``...), checkpoints (``save_svf``, ``load_svf``, ``read_svf``), adapters
(``set_adapter``, ``mix_adapters``, ``disable_adapter``...), the Hub (``push_to_hub``) and the decomposition cache
(``DecompositionCache``). Their modules (``svftune.checkpoint``, ``svftune.adapters``, ``svftune.hub``,
``svftune.cache``) hold the lower-level pieces.
"""

from ._interop import SVFSaveWarning, enable_svf_training, merged_state_dict
from .decompose import thin_svd
from .layers import SVFConv1D, SVFConv1d, SVFConv2d, SVFConv3d, SVFLayer, SVFLinear, svf_layer_from
from .matching import SVFSelectionWarning, select_layers
from .model import (
    SVFConfig,
    apply_svf,
    freeze_batchnorm,
    merge_svf,
    print_trainable_parameters,
    svf_layers,
    trainable_parameters,
    unapply_svf,
    unfreeze_batchnorm,
)

__version__ = "0.1.0"

__all__ = [
    "SVFConfig",
    "SVFConv1D",
    "SVFConv1d",
    "SVFConv2d",
    "SVFConv3d",
    "SVFLayer",
    "SVFLinear",
    "SVFSaveWarning",
    "SVFSelectionWarning",
    "__version__",
    "apply_svf",
    "enable_svf_training",
    "freeze_batchnorm",
    "merge_svf",
    "merged_state_dict",
    "print_trainable_parameters",
    "select_layers",
    "svf_layer_from",
    "svf_layers",
    "thin_svd",
    "trainable_parameters",
    "unapply_svf",
    "unfreeze_batchnorm",
]

# Checkpoints, adapters and the Hub (svftune.checkpoint, svftune.adapters, svftune.hub).
from .adapters import active_adapter, delete_adapter, disable_adapter, list_adapters, mix_adapters, set_adapter
from .cache import DecompositionCache
from .checkpoint import SVFCheckpoint, load_svf, read_svf, save_svf
from .errors import SVFCheckpointError
from .hub import push_to_hub
from .verbs import add_adapter, get_base_model, merge_adapter, unmerge_adapter

__all__ += [
    "DecompositionCache",
    "SVFCheckpoint",
    "SVFCheckpointError",
    "active_adapter",
    "add_adapter",
    "delete_adapter",
    "disable_adapter",
    "get_base_model",
    "list_adapters",
    "load_svf",
    "merge_adapter",
    "mix_adapters",
    "push_to_hub",
    "read_svf",
    "save_svf",
    "set_adapter",
    "unmerge_adapter",
]
