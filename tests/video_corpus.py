"""The videos people actually have, made at test time from runner_1080p.mp4 (tests.support.RUNNER_MP4,
the same bytes as ../shared/media/runner_1080p.mp4) with the system ffmpeg.

Each Clip says how it is made (the ffmpeg arguments, also printed in docs/video-corpus.md) and
what the mesh must make of it. Clips are short (≈1.5 s) and ~640 px wide wherever resolution does
not matter to the case, so the whole corpus goes through the mesh in a few minutes on 2 cores.

Reference timestamps come from ffprobe (Debian's FFmpeg 5.1, not the FFmpeg 8 inside PyAV that the
services use), read independently of the services' code: each frame's pts in presentation order,
or for AVI, which stores no presentation timestamps, the chunk slots (packet dts) in order.
"""

from __future__ import annotations

import functools
import json
import shutil
import subprocess
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import pytest

from tests.support import RUNNER_MP4

FFMPEG = shutil.which("ffmpeg")
FFPROBE = shutil.which("ffprobe")
FRAMES = 45  # 1.5 s of the 30 fps runner
SMALL = "scale=640:-2"  # 1920×1088 → 640×362
X264 = ["-c:v", "libx264", "-preset", "veryfast", "-bf", "2", "-pix_fmt", "yuv420p"]
SINE = "-f lavfi -i sine=frequency=440:duration=2"  # an audio track, as cameras and phones record
SUCCEEDED, NO_PERSON, NOT_A_VIDEO = "SUCCEEDED", "NO_PERSON", "NOT_A_VIDEO"


@dataclass(frozen=True)
class Clip:
    name: str
    filename: str
    steps: tuple[tuple[str, ...], ...]  # ffmpeg argument lists; {src} {out} {tmp} are substituted
    outcome: str = SUCCEEDED  # SUCCEEDED, or the JobError / upload ErrorInfo reason expected
    upright_size: tuple[int, int] | None = None  # (width, height) the probe and tracker must report
    needs_encoder: str = ""  # skip the clip when this ffmpeg lacks the encoder
    slot_timed: bool = False  # AVI: the reference is the chunk slots, not frame pts
    notes: str = ""

    @property
    def made_with(self) -> str:
        return " && ".join("ffmpeg " + " ".join(step) for step in self.steps)


def _encode(*args: str, out: str = "{out}", src: str = "-i {src}", frames: int = FRAMES,
            audio: str = "") -> tuple[str, ...]:
    """One ffmpeg run: the inputs, `frames` video frames, the output options; `audio`: an audio
    codec for a sine track muxed beside the video."""
    inputs = f"{src} {SINE}" if audio else src
    sound = ("-map", "0:v", "-map", "1:a", "-c:a", audio, "-shortest") if audio else ("-an",)
    return (*inputs.split(), "-frames:v", str(frames), *args, *sound, out)


def _phone(rotation: int, turn: str) -> Clip:
    # The recipe in ../shared/notes/real-servers.md: code the picture turned, then set the display
    # matrix on a stream copy (-metadata rotate does nothing while re-encoding).
    side = "{tmp}/side-%d.mp4" % rotation
    return Clip(
        f"phone_rotate_{rotation}", f"phone_rotate_{rotation}.mp4",
        (_encode("-vf", f"{SMALL},{turn}", *X264, out=side),
         ("-i", side, "-c", "copy", "-metadata:s:v:0", f"rotate={rotation}", "{out}")),
        upright_size=(640, 362),
        notes=f"coded {'362×640' if rotation != 180 else '640×362 upside down'}, display matrix rotate={rotation}",
    )


CLIPS: tuple[Clip, ...] = (
    Clip("mp4_h264", "mp4_h264.mp4", (_encode("-vf", SMALL, *X264, audio="aac"),),
         upright_size=(640, 362), notes="moov at the end: the tracker spools it"),
    Clip("mp4_h264_faststart", "mp4_h264_faststart.mp4",
         (_encode("-vf", SMALL, *X264, "-movflags", "+faststart"),),
         upright_size=(640, 362), notes="moov first: decoded while the bytes arrive"),
    Clip("mov_h264", "mov_h264.mov", (_encode("-vf", SMALL, *X264, audio="aac"),),
         upright_size=(640, 362)),
    Clip("mkv_h264", "mkv_h264.mkv", (_encode("-vf", SMALL, *X264),), upright_size=(640, 362)),
    Clip("webm_vp9", "webm_vp9.webm",
         (_encode("-vf", SMALL, "-c:v", "libvpx-vp9", "-deadline", "realtime", "-cpu-used", "8", "-b:v", "1M",
                  audio="libopus"),),
         upright_size=(640, 362)),
    Clip("avi_mpeg4", "avi_mpeg4.avi",
         (_encode("-vf", SMALL, "-c:v", "mpeg4", "-vtag", "XVID", "-q:v", "4", "-bf", "2"),),
         upright_size=(640, 362), slot_timed=True, notes="MPEG-4 Part 2 (Xvid tag) with B-frames"),
    Clip("avi_h264_bframes_1080p", "avi_h264_bframes_1080p.avi",
         (_encode("-vf", "scale=1920:1080", *X264),),
         upright_size=(1920, 1080), slot_timed=True, notes="as in NTU RGB+D: 1920×1080 30 fps, H.264 B-frames"),
    Clip("hevc_mp4", "hevc_mp4.mp4",
         (_encode("-vf", SMALL, "-c:v", "libx265", "-preset", "ultrafast", "-tag:v", "hvc1",
                  "-x265-params", "log-level=error"),),
         upright_size=(640, 362)),
    Clip("av1_mp4", "av1_mp4.mp4",
         (_encode("-vf", SMALL, "-c:v", "libsvtav1", "-preset", "12", "-crf", "40"),),
         upright_size=(640, 362), needs_encoder="libsvtav1"),
    Clip("vfr_mp4", "vfr_mp4.mp4",
         (_encode("-vf", f"{SMALL},setpts='(N+N*N/60)/30/TB'", "-fps_mode", "passthrough", *X264),),
         upright_size=(640, 362), notes="frame gaps grow from 33 ms to 83 ms"),
    _phone(90, "transpose=clock"),
    _phone(180, "hflip,vflip"),
    _phone(270, "transpose=cclock"),
    Clip("odd_size_webm", "odd_size_webm.webm",
         (_encode("-vf", "scale=641:361", "-c:v", "libvpx-vp9", "-deadline", "realtime", "-cpu-used", "8",
                  "-b:v", "1M"),),
         upright_size=(641, 361), notes="641×361 VP9 4:2:0 (a cropped screen or window recording)"),
    Clip("h264_10bit", "h264_10bit.mp4",
         (_encode("-vf", SMALL, "-c:v", "libx264", "-preset", "veryfast", "-pix_fmt", "yuv420p10le"),),
         upright_size=(640, 362), notes="High 10 profile, yuv420p10le"),
    Clip("interlaced_ts", "interlaced_ts.ts",
         (_encode("-vf", "scale=640:360,tinterlace=interleave_top,setfield=tff", "-flags", "+ildct+ilme",
                  "-c:v", "libx264", "-preset", "veryfast", "-x264-params", "interlaced=1:tff=1"),),
         upright_size=(640, 360), notes="MPEG-TS, field-coded H.264, top field first: 90 source frames woven into 45"),
    Clip("fps60", "fps60.mp4", (_encode("-vf", f"{SMALL},framerate=60", *X264, frames=60),),
         upright_size=(640, 362), notes="1 s at 60 fps (frames blended from the 30 fps source)"),
    Clip("nobody_testsrc2", "nobody_testsrc2.mp4",
         (_encode(*X264, src="-f lavfi -i testsrc2=size=640x360:rate=30"),),
         outcome=NO_PERSON, notes="synthetic test pattern, no person"),
    Clip("very_dark", "very_dark.mp4",
         (_encode("-vf", f"{SMALL},lutrgb=r=val*0.08:g=val*0.08:b=val*0.08", *X264),),
         upright_size=(640, 362), notes="RGB × 0.08: 99th percentile 19 of 255, brightest 24"),
    Clip("audio_only", "audio_only.m4a",
         (("-f", "lavfi", "-i", "sine=frequency=440:duration=1.5", "-c:a", "aac", "{out}"),),
         outcome=NOT_A_VIDEO, notes="AAC in MP4, no video stream: refused at upload"),
)


def clip(name: str) -> Clip:
    return next(c for c in CLIPS if c.name == name)


def require_tools(clip_: Clip | None = None) -> Path:
    """The source video; skips the test (with the reason) when ffmpeg, ffprobe, ../shared or the
    clip's encoder is missing."""
    if FFMPEG is None or FFPROBE is None:
        pytest.skip("ffmpeg/ffprobe not on PATH: the video corpus is made with them at test time")
    if not RUNNER_MP4.is_file():
        pytest.skip(f"{RUNNER_MP4} is missing: the corpus is made from it")
    if clip_ is not None and clip_.needs_encoder and clip_.needs_encoder not in encoders():
        pytest.skip(f"this ffmpeg has no {clip_.needs_encoder} encoder: {clip_.name} cannot be made")
    return RUNNER_MP4


@functools.cache
def encoders() -> frozenset[str]:
    listing = subprocess.run([FFMPEG, "-hide_banner", "-encoders"], capture_output=True, text=True, check=True).stdout
    return frozenset(line.split()[1] for line in listing.splitlines() if line.startswith(" ") and len(line.split()) > 1)


def make_clip(clip: Clip, src: Path, out_dir: Path) -> Path:
    """Runs the clip's ffmpeg steps; returns the file."""
    out = out_dir / clip.filename
    values = {"src": str(src), "out": str(out), "tmp": str(out_dir)}
    for step in clip.steps:
        args = [arg.format(**values) for arg in step]
        subprocess.run([FFMPEG, "-hide_banner", "-loglevel", "error", "-y", *args], check=True, timeout=300,
                       capture_output=True)
    return out


@dataclass
class Reference:
    """What ffprobe says about a clip's first video stream."""

    width: int
    height: int
    timestamps_s: list[float] = field(default_factory=list)  # presentation order, from the stream start


def _ffprobe(path: Path, *entries: str) -> dict:
    result = subprocess.run([FFPROBE, "-v", "error", "-select_streams", "v:0", *entries, "-of", "json", str(path)],
                            capture_output=True, text=True, check=True, timeout=120)
    return json.loads(result.stdout)


def reference(path: Path, *, slot_timed: bool) -> Reference:
    """Frame times by ffprobe: frame pts (presentation order) minus the stream's start, or for a
    slot-timed container (AVI) the sorted dts of its non-empty chunks."""
    stream = _ffprobe(path, "-show_entries", "stream=width,height,time_base,start_pts")["streams"][0]
    time_base = Fraction(stream["time_base"])
    start = int(stream.get("start_pts", 0) or 0)
    if slot_timed:
        packets = _ffprobe(path, "-show_entries", "packet=dts,size")["packets"]
        ticks = sorted(int(p["dts"]) for p in packets if int(p.get("size", 0)) and "dts" in p)
    else:
        frames = _ffprobe(path, "-show_entries", "frame=pts,best_effort_timestamp")["frames"]
        ticks = [int(f.get("pts", f.get("best_effort_timestamp"))) for f in frames]
    return Reference(int(stream["width"]), int(stream["height"]), [float((t - start) * time_base) for t in ticks])


