"""Videos with unusual frame shapes (16000×16 slivers, panoramas), made on the fly with PyAV."""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np


def write_h264_mp4(path: Path, width: int, height: int, frames: int = 30, fps: int = 30) -> Path:
    """An H.264 MP4 (index at the end, as cameras write it) of a moving colour gradient."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps, options={"preset": "ultrafast"})
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        x = np.arange(width, dtype=np.uint16)[None, :]
        y = np.arange(height, dtype=np.uint16)[:, None]
        for i in range(frames):
            rgb = np.stack(np.broadcast_arrays((x + 8 * i) % 256, (y + 4 * i) % 256, (x + y) % 256), -1).astype(np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")))
        container.mux(stream.encode(None))
    return path
