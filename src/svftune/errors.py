"""The exceptions svftune raises for files and names that come from outside.

``SVFCheckpointError`` covers every problem with a checkpoint or with the model it is loaded onto; the message
says what was wrong and how to fix it. ``SVFAdapterError`` (a subclass, so ``except SVFCheckpointError`` still
catches it) is raised for adapter lookups: an unknown adapter name is not a problem of any file.
``SVFConfigError`` is raised by ``SVFConfig.from_json`` for a stored configuration that is not valid; the checkpoint
reader turns it into an ``SVFCheckpointError`` naming the metadata field.
"""

from __future__ import annotations

__all__ = ["SVFAdapterError", "SVFCheckpointError", "SVFConfigError"]


class SVFCheckpointError(ValueError):
    """A checkpoint cannot be read, or does not fit the model it is loaded onto.

    The message says what was wrong and how to fix it. Whenever this is raised by ``load_svf``, the model is
    exactly as it was before the call.
    """


class SVFAdapterError(SVFCheckpointError):
    """An adapter operation names an adapter the model does not have, or the model has no adapters."""


class SVFConfigError(ValueError):
    """A stored ``SVFConfig`` mapping (``SVFConfig.from_json``) holds a missing, unknown or invalid field.

    Attributes:
        field: the key that is wrong (``"freeze_bn"``; an empty string for the mapping itself).
        expected: what the key should hold, in words.
        got: what it holds.
    """

    def __init__(self, field: str, expected: str, got: object) -> None:
        self.field, self.expected, self.got = field, expected, got
        shown = repr(got)
        shown = shown if len(shown) < 80 else shown[:77] + "..."
        super().__init__(f"config{'.' + field if field else ''} should be {expected}, got {shown}")
