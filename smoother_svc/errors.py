"""Every failure the smoother's domain raises on purpose, in one place.

    SmootherError
    ├── BadTracks              the tracks are malformed (non-finite or absurd landmarks, ...)
    ├── NoCheckpoint           the learned method was asked for and no checkpoint exists
    ├── TrainingFailed         training stopped: the loss diverged, or the data is unusable
    ├── TrainingInterrupted    the service is shutting down and stopped the run
    └── CheckpointWriteFailed  training finished but its checkpoint could not be written

`server.py` maps them to status codes (INVALID_ARGUMENT BAD_TRACKS, FAILED_PRECONDITION
NO_CHECKPOINT, ABORTED TRAINING_FAILED, UNAVAILABLE NOT_READY, INTERNAL TRAINING_FAILED). Lease loss is the lease
client's `LeaseLost` (ABORTED LEASE_LOST).
"""

from __future__ import annotations


class SmootherError(Exception):
    """Base class of every error the smoother raises on purpose."""


class BadTracks(SmootherError):
    """A track field is malformed; `field` names it like the codec does ("tracks[0].frames[3]")."""

    def __init__(self, field: str, description: str) -> None:
        super().__init__(f"malformed pose tracks: {field} {description}")
        self.field = field
        self.description = description


class NoCheckpoint(SmootherError):
    """The learned smoother has no checkpoint yet (train one with Train)."""


class TrainingFailed(SmootherError):
    """Training stopped before producing a model; the message says why (safe to show)."""


class TrainingInterrupted(SmootherError):
    """The run was stopped by the service shutting down; retry on another instance or later."""


class CheckpointWriteFailed(SmootherError):
    """The trained model could not be stored; nothing was published."""
