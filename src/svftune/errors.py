"""The exceptions svftune raises for files and names that come from outside.

``SVFCheckpointError`` covers every problem with a checkpoint or with the model it is loaded onto; the message
says what was wrong and how to fix it. ``SVFAdapterError`` (a subclass, so ``except SVFCheckpointError`` still
catches it) is raised for adapter lookups: an unknown adapter name is not a problem of any file.
"""

from __future__ import annotations

__all__ = ["SVFAdapterError", "SVFCheckpointError"]


class SVFCheckpointError(ValueError):
    """A checkpoint cannot be read, or does not fit the model it is loaded onto.

    The message says what was wrong and how to fix it. Whenever this is raised by ``load_svf``, the model is
    exactly as it was before the call.
    """


class SVFAdapterError(SVFCheckpointError):
    """An adapter operation names an adapter the model does not have, or the model has no adapters."""
