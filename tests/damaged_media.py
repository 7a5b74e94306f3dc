"""Damaged videos, made at test time: short 640-wide cuts of runner_1080p.mp4 (ffmpeg), then bytes
overwritten with seeded random garbage, as a failing disk, a broken download or an attacker leaves
them.

- `overwrite_middle`: 4 kB in the middle of the file, wherever they fall (in an MP4 the index
  still gives the packets' bounds, so the garbage reaches the decoder);
- `overwrite_packet`: 4 kB from the start of the first packet past the middle (in AVI too the
  demuxer then still delivers the packet, and the decoder refuses it);
- `damage_packets`: the head of a given fraction of the packets (after the first second), each
  of which the decoder then refuses.
"""

from __future__ import annotations

import random
import re
import shutil
import subprocess
from pathlib import Path

import av

from tests.support import RUNNER_MP4

FFMPEG = shutil.which("ffmpeg")
FRAMES = 60  # 2 s of the 30 fps runner
H264 = ("-c:v", "libx264", "-preset", "veryfast", "-bf", "2", "-g", "30", "-pix_fmt", "yuv420p")
XVID = ("-c:v", "mpeg4", "-vtag", "XVID", "-q:v", "4", "-bf", "2", "-g", "30")
# What a client must never see in an error message: FFmpeg's error numbers, its function names,
# hexadecimal codes, file paths.
INTERNALS = re.compile(r"errno|avcodec|avformat|ff_|0x[0-9a-f]|/|\\\\", re.IGNORECASE)


def runner_clip(path: Path, codec: tuple[str, ...] = H264, frames: int = FRAMES) -> Path:
    """`frames` frames of the runner, 640×362, keyframes every second; container from the suffix."""
    if FFMPEG is None:
        import pytest

        pytest.skip("ffmpeg not on PATH: the damaged clips are made with it at test time (CI installs it)")
    subprocess.run([FFMPEG, "-v", "error", "-y", "-i", str(RUNNER_MP4), "-frames:v", str(frames),
                    "-vf", "scale=640:-2", *codec, "-an", str(path)], check=True)
    return path


def packets(path: Path) -> list[tuple[int, int, bool]]:
    """(byte position, size, keyframe) of every video packet with data, in file order."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        return [(p.pos, p.size, p.is_keyframe) for p in container.demux(stream) if p.size and p.pos is not None]


def _garbage(seed: int, size: int) -> bytes:
    return random.Random(seed).randbytes(size)


def overwrite_middle(src: Path, dst: Path, size: int = 4096, seed: int = 8) -> Path:
    data = bytearray(src.read_bytes())
    middle = len(data) // 2
    data[middle:middle + size] = _garbage(seed, size)
    dst.write_bytes(bytes(data))
    return dst


def overwrite_packet(src: Path, dst: Path, size: int = 4096, seed: int = 8, keyframe: bool = False) -> Path:
    """`size` bytes from the start of the first packet past the middle (with `keyframe`: of the
    keyframe nearest the middle, the first one excepted)."""
    data = bytearray(src.read_bytes())
    middle = len(data) // 2
    if keyframe:
        pos = min((p[0] for p in packets(src)[1:] if p[2]), key=lambda at: abs(at - middle))
    else:
        pos = next(p[0] for p in packets(src) if p[0] >= middle)
    data[pos:pos + size] = _garbage(seed, size)
    dst.write_bytes(bytes(data))
    return dst


def damage_packets(src: Path, dst: Path, fraction: float, seed: int = 8, head: int = 48) -> int:
    """Overwrites the first `head` bytes of `fraction` of the packets after the first second
    (spread evenly, so the probe's first frame still decodes); returns how many."""
    data = bytearray(src.read_bytes())
    found = packets(src)
    later = found[30:]
    chosen = [later[i] for i in range(len(later)) if int((i + 1) * fraction) > int(i * fraction)]
    while len(chosen) < fraction * len(found):  # at least `fraction` of the whole video
        chosen.append(next(p for p in later if p not in chosen))
    rng = random.Random(seed)
    for pos, size, _ in chosen:
        data[pos:pos + min(size, head)] = rng.randbytes(min(size, head))
    dst.write_bytes(bytes(data))
    return len(chosen)


def pts_seconds(path: Path) -> dict[int, float]:
    """Clean reference: each frame's pts (its packet's identity) → presentation time, as
    mocap_common.media gives it."""
    from mocap_common.media import presentation_frames

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        return {timed.frame.pts: timed.timestamp_s for timed in presentation_frames(container, stream)}
