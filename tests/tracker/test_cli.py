"""`python -m tracker_svc track` writes a loadable PoseTrackSet and an overlay, and says what it did."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import av
import pytest

from tests.tracker.conftest import REPO_ROOT
from tracker_svc.model_setup import ModelPaths
from mocap_common.trackio import load_track_set


@pytest.mark.slow
def test_track_command(models: ModelPaths, street_path: Path, tmp_path: Path) -> None:
    out, overlay = tmp_path / "street.npz", tmp_path / "street.mp4"
    result = subprocess.run(
        [sys.executable, "-m", "tracker_svc", "track", str(street_path), "--out", str(out),
         "--max-persons", "2", "--overlay", str(overlay), "--threads", "2"],
        capture_output=True, text=True, cwd=REPO_ROOT, timeout=600, check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "205 frames" in result.stdout and "fps" in result.stdout
    tracks = load_track_set(out)
    assert tracks.video.frame_count == 205
    assert 1 <= len(tracks.tracks) <= 3  # at most 2 at once; one may be lost and replaced
    with av.open(str(overlay)) as container:
        assert sum(1 for _ in container.decode(video=0)) == 205


def test_track_command_reports_missing_models(tmp_path: Path, street_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "tracker_svc", "track", str(street_path), "--out", str(tmp_path / "x.npz"),
         "--model-dir", str(tmp_path)],
        capture_output=True, text=True, cwd=REPO_ROOT, timeout=300, check=False,
    )
    assert result.returncode == 1
    assert "make setup" in result.stderr


def test_mocap_track_runs_the_same_pipeline(models: ModelPaths, runner_path: Path, tmp_path: Path) -> None:
    """`mocap track` (the user-facing CLI) tracks a local file without any service running."""
    out = tmp_path / "runner.npz"
    mocap = Path(sys.executable).parent / "mocap"
    result = subprocess.run([str(mocap), "track", str(runner_path), "--out", str(out), "--max-persons", "1"],
                            capture_output=True, text=True, cwd=REPO_ROOT, timeout=300, check=False)
    assert result.returncode == 0, result.stderr
    tracks = load_track_set(out)
    assert len(tracks.tracks) == 1 and len(tracks.tracks[0]) >= 175
    missing = subprocess.run([str(mocap), "track", str(tmp_path / "nope.mp4"), "--out", str(out)],
                             capture_output=True, text=True, timeout=60, check=False)
    assert missing.returncode == 3 and "no such file" in missing.stderr
