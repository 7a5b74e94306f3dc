"""Every failure the tracker's domain can raise, in one place.

    TrackerError
    ├── ModelsMissingError        model files absent or corrupt in the cache ("run `make setup`")
    ├── ModelSetupError           downloading / extracting the models failed
    ├── UnsupportedModelError     a .tflite graph uses an op or feature the interpreter does not port
    ├── VideoError                the input cannot be opened or decoded
    │   └── AspectRatioError      its frames are wider (or taller) than the tracker covers
    └── TrackingCancelled         the caller's cancellation flag was set; work stopped between batches

The gRPC server maps these to status codes in one place; nothing here knows about gRPC.
"""

from __future__ import annotations


class TrackerError(Exception):
    """Base class of every error the tracker raises on purpose."""


class ModelsMissingError(TrackerError):
    """The model cache lacks a verified copy of a model file."""


class ModelSetupError(TrackerError):
    """Fetching the mediapipe wheel or extracting the models from it failed."""


class UnsupportedModelError(TrackerError):
    """The flatbuffer uses an operator, data type or option this interpreter does not implement."""


class VideoError(TrackerError):
    """The video cannot be opened, has no video stream, or fails to decode."""


class AspectRatioError(VideoError):
    """The frames' long side exceeds `limit` times the short side (the detector cannot cover them)."""

    def __init__(self, width: int, height: int, limit: float) -> None:
        self.width, self.height, self.limit = width, height, limit
        aspect = max(width, height) / min(width, height)
        super().__init__(f"the frames are {width}×{height} (aspect ratio {aspect:.2f}:1); "
                         f"the tracker accepts at most {limit:g}:1 either way")


class TrackingCancelled(TrackerError):
    """Raised when the caller's cancel event is set; tracking stopped at a batch boundary."""
