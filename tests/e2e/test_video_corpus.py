"""The videos people actually have, through the whole mesh (all five real services, one mesh for
the module, started as the other e2e tests start it) and the user's CLI.

Every clip of tests/video_corpus.py is made at test time from runner_1080p.mp4 with ffmpeg, then
submitted with `mocap submit --wait`. Each must end as its Clip says:
- SUCCEEDED, with the pose tracks' timestamps strictly increasing and equal to the presentation
  times ffprobe reads from the file, the probe's and the tracker's size upright, the person upright
  in the tracks (shoulders above hips in image space) and in the BVH (hips→head points up), and a
  preview of every frame, upright;
- or FAILED with the JobError reason NO_PERSON (nobody in the picture);
- or refused at upload with INVALID_ARGUMENT and the ErrorInfo reason NOT_A_VIDEO (no picture at all).

The module writes what it measured to corpus-summary.json / .md in its temporary directory (and
into $MOCAP_CORPUS_SUMMARY_DIR when set): docs/video-corpus.md is filled from it.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
import pytest
from google.protobuf import json_format
from google.rpc import error_details_pb2  # noqa: F401 - registers ErrorInfo for JobError.status in the job JSON

from mocap.v1 import common_pb2
from mocap_common.bvh import forward_kinematics, read_bvh
from mocap_common.poses import LANDMARK_NAMES
from tests.video_corpus import CLIPS, NO_PERSON, NOT_A_VIDEO, SUCCEEDED, Clip, make_clip, reference, require_tools

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(900)]

MOCAP = Path(sys.executable).parent / "mocap"
EXIT_JOB_FAILED, EXIT_INVALID = 1, 2  # `mocap` exit codes (README)
SHOULDERS = [LANDMARK_NAMES.index("left_shoulder"), LANDMARK_NAMES.index("right_shoulder")]
HIPS = [LANDMARK_NAMES.index("left_hip"), LANDMARK_NAMES.index("right_hip")]
TIMESTAMP_TOLERANCE_S = 1e-6


@dataclass
class Submission:
    """What `mocap submit --wait` left: its exit code, the job (if the upload was accepted), the files."""

    returncode: int
    stderr: str
    job: common_pb2.Job | None
    out: Path
    seconds: float

    def upload_refusal(self) -> tuple[str, str, str] | None:
        """(gRPC code, ErrorInfo reason, message) when the upload was refused."""
        found = re.search(r"error: (\w+) \[(\w+)\]: (.*)", self.stderr)
        return found.groups() if found else None  # type: ignore[return-value]


def _mocap(mesh_: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(MOCAP), "--addr", mesh_["gateway"], "--quiet", *args], env=mesh_["env"],
                          capture_output=True, text=True, timeout=600)


def _submit(mesh_: dict, video: Path, out: Path) -> Submission:
    started = time.monotonic()
    result = _mocap(mesh_, "submit", str(video), "--wait", "--out", str(out))
    seconds = time.monotonic() - started
    name = result.stdout.split("\n", 1)[0].strip()
    job = None
    if name.startswith("jobs/"):
        got = _mocap(mesh_, "get", name, "--json")
        job = json_format.Parse(got.stdout, common_pb2.Job())
    return Submission(result.returncode, result.stderr, job, out, seconds)


def _logs(mesh_: dict) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in sorted(mesh_["logs"].glob("*.log")))


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("corpus")


@pytest.fixture(scope="module")
def summary(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, dict]]:
    """Rows measured by the tests, written out when the module ends (whatever the results)."""
    rows: dict[str, dict] = {}
    yield rows
    directories = [tmp_path_factory.mktemp("corpus-summary")]
    if os.environ.get("MOCAP_CORPUS_SUMMARY_DIR"):
        directories.append(Path(os.environ["MOCAP_CORPUS_SUMMARY_DIR"]))
    ordered = [rows[c.name] for c in CLIPS if c.name in rows]
    for directory in directories:
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "corpus-summary.json").write_text(json.dumps(ordered, indent=2))
        (directory / "corpus-summary.md").write_text(_markdown(ordered))
    print(f"\nvideo corpus summary: {directories[-1] / 'corpus-summary.md'}\n{_markdown(ordered)}")


def _markdown(rows: list[dict]) -> str:
    header = ("| clip | container / codec | coded → probed (tracker) size | frames | outcome | persons | "
              "timestamps vs ffprobe | upright | preview | s |")
    lines = [header, "|" + "---|" * 10]
    for r in rows:
        lines.append(f"| {r['clip']} | {r.get('container', '')} / {r.get('codec', '')} | {r.get('sizes', '')} | "
                     f"{r.get('frames', '')} | {r.get('outcome', '')} | {r.get('persons', '')} | "
                     f"{r.get('timestamps', '')} | {r.get('upright', '')} | {r.get('preview', '')} | "
                     f"{r.get('seconds', '')} |")
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("clip_", CLIPS, ids=[c.name for c in CLIPS])
def test_clip_through_the_mesh(clip_: Clip, mesh: dict, corpus_dir: Path, summary: dict, tmp_path: Path) -> None:  # noqa: F811
    video = make_clip(clip_, require_tools(clip_), corpus_dir)
    row: dict = {"clip": clip_.name, "made_with": clip_.made_with, "notes": clip_.notes}
    summary[clip_.name] = row
    submission = _submit(mesh, video, tmp_path / "out")
    row["seconds"] = round(submission.seconds, 1)
    if clip_.outcome == NOT_A_VIDEO:
        _check_refused(clip_, submission, row)
        return
    assert submission.job is not None, f"upload refused: {submission.stderr}"
    job = submission.job
    row.update(container=job.video.container, codec=job.video.codec, outcome=_outcome(job))
    if clip_.outcome == NO_PERSON:
        _check_no_person(submission, row)
        return
    assert submission.returncode == 0, f"{row['outcome']}: {submission.stderr[-2000:]}\n{_logs(mesh)}"
    _check_succeeded(clip_, video, submission, row)


def _outcome(job: common_pb2.Job) -> str:
    state = common_pb2.JobState.Name(job.state).removeprefix("JOB_STATE_")
    return f"{state} [{job.error.reason}]" if job.error.reason else state


def _check_refused(clip_: Clip, submission: Submission, row: dict) -> None:
    refusal = submission.upload_refusal()
    row["outcome"] = f"refused at upload: {refusal[0]} [{refusal[1]}] {refusal[2]}" if refusal else submission.stderr
    assert submission.returncode == EXIT_INVALID and submission.job is None
    assert refusal is not None and refusal[:2] == ("INVALID_ARGUMENT", clip_.outcome), submission.stderr


def _check_no_person(submission: Submission, row: dict) -> None:
    job = submission.job
    assert job is not None
    row.update(persons=0, outcome=f"{row['outcome']}: {job.error.message}")
    assert submission.returncode == EXIT_JOB_FAILED
    assert job.state == common_pb2.JOB_STATE_FAILED and job.error.reason == NO_PERSON
    assert job.error.stage == common_pb2.JOB_STAGE_TRACK and not job.artifacts
    assert not submission.out.exists() or not list(submission.out.iterdir())


def _check_succeeded(clip_: Clip, video: Path, submission: Submission, row: dict) -> None:
    job = submission.job
    assert job is not None and job.state == common_pb2.JOB_STATE_SUCCEEDED
    expected = reference(video, slot_timed=clip_.slot_timed)
    stem = video.stem
    tracks = common_pb2.PoseTrackSet.FromString((submission.out / f"{stem}-tracks.pb").read_bytes())
    row["sizes"] = (f"{expected.width}×{expected.height} → {job.video.width}×{job.video.height} "
                    f"({tracks.video.width}×{tracks.video.height})")
    row["frames"] = len(expected.timestamps_s)
    row["persons"] = len(tracks.tracks)
    assert (job.video.width, job.video.height) == clip_.upright_size
    assert (tracks.video.width, tracks.video.height) == clip_.upright_size
    assert tracks.tracks, "no person tracked"
    row["timestamps"] = _check_timestamps(tracks, expected.timestamps_s)
    row["upright"] = _check_upright(tracks, submission.out / f"{stem}-person-{tracks.tracks[0].track_id}.bvh")
    row["preview"] = _check_preview(submission.out / f"{stem}-preview.mp4", clip_.upright_size, row["frames"])


def _check_timestamps(tracks: common_pb2.PoseTrackSet, expected: list[float]) -> str:
    """Every tracked frame's time is the file's presentation time of that frame; times increase."""
    worst, count = 0.0, 0
    for track in tracks.tracks:
        index = np.array([f.frame_index for f in track.frames])
        stamps = np.array([f.timestamp_seconds for f in track.frames])
        assert np.all(np.diff(index) > 0) and np.all(np.diff(stamps) > 0), stamps[:10]
        assert index.max() < len(expected)
        error = np.abs(stamps - np.asarray(expected)[index])
        worst, count = max(worst, float(error.max())), count + len(index)
        assert error.max() <= TIMESTAMP_TOLERANCE_S, (index[error.argmax()], stamps[error.argmax()])
    return f"{count} frames, strictly increasing, max error {worst:.1e} s"


def _check_upright(tracks: common_pb2.PoseTrackSet, bvh_path: Path) -> str:
    """Shoulders above hips in the tracks' image landmarks (y grows downwards); the exported
    skeleton's hips→head vector points up (BVH +Y) in its first frame."""
    track = tracks.tracks[0]
    image = np.array([f.image_landmarks for f in track.frames], dtype=np.float64).reshape(len(track.frames), -1, 5)
    above = image[:, SHOULDERS, 1].mean(axis=1) < image[:, HIPS, 1].mean(axis=1)
    clip = read_bvh(bvh_path)
    pose = forward_kinematics(clip)
    spine = pose.positions[0, clip.index("Head")] - pose.positions[0, clip.index("Hips")]
    tilt = float(np.degrees(np.arccos(spine[1] / np.linalg.norm(spine))))
    assert above.mean() >= 0.9, f"shoulders above hips in only {above.mean():.0%} of frames"
    assert tilt < 45.0, f"the exported skeleton leans {tilt:.0f}° from vertical in frame 0"
    return f"shoulders over hips {above.mean():.0%}; BVH hips→head {tilt:.0f}° from up"


def _check_preview(path: Path, upright: tuple[int, int], frames: int) -> str:
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        size = (stream.codec_context.width, stream.codec_context.height)
        count = sum(1 for _ in container.decode(stream))
    assert count == frames
    width, height = upright
    assert size[0] / size[1] == pytest.approx(width / height, rel=0.02)  # upright (even-rounded, ≤ 720 lines)
    return f"{size[0]}×{size[1]}, {count} frames"


def test_every_outcome_is_one_of_the_documented_ones() -> None:
    assert {c.outcome for c in CLIPS} <= {SUCCEEDED, NO_PERSON, NOT_A_VIDEO}
    errors = (Path(__file__).resolve().parents[2] / "protos" / "mocap" / "v1" / "errors.proto").read_text()
    for reason in (NO_PERSON, NOT_A_VIDEO):
        assert f"ERROR_REASON_{reason} " in errors
