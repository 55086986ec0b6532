"""Training, testing and result tables for the FSS reproduction (``svf-fss train/test/reproduce/table``)."""

from .config import ConfigError, RunConfig, load_config
from .engine import build_datasets, build_optimizer, build_run_model, evaluate, test, train
from .runtime import Process, lr_factor, setup_process

__all__ = [
    "ConfigError",
    "Process",
    "RunConfig",
    "build_datasets",
    "build_optimizer",
    "build_run_model",
    "evaluate",
    "load_config",
    "lr_factor",
    "setup_process",
    "test",
    "train",
]
