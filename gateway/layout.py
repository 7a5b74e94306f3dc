"""Where a job's files live. Each job owns `data/jobs/{job_id}/` and nothing outside it:

    upload.part         bytes of an upload still streaming or interrupted (resumable)
    input.<ext>         the probed video (ext from the probe, never from the client)
    tracks.raw.pb       tracker output, binary mocap.v1.PoseTrackSet      (intermediate)
    tracks.smooth.pb    smoother output, binary mocap.v1.PoseTrackSet     (intermediate)
    artifacts/<name>    the files clients download, kept until retention

Every path is built with `mocap_common.files.inside`, so no name can leave the directory.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from mocap_common.files import inside

PARTIAL_NAME = "upload.part"
RAW_TRACKS_NAME = "tracks.raw.pb"
SMOOTH_TRACKS_NAME = "tracks.smooth.pb"
ARTIFACTS_DIR_NAME = "artifacts"


class JobDir:
    """The directory of one job (or of the upload that becomes it)."""

    def __init__(self, jobs_root: Path, job_id: str) -> None:
        self.job_id = job_id
        self.path = inside(jobs_root, job_id)

    def create(self) -> None:
        self.path.mkdir(parents=True, exist_ok=False)

    @property
    def partial(self) -> Path:
        return inside(self.path, PARTIAL_NAME)

    def input(self, name: str) -> Path:
        return inside(self.path, name)

    @property
    def raw_tracks(self) -> Path:
        return inside(self.path, RAW_TRACKS_NAME)

    @property
    def smooth_tracks(self) -> Path:
        return inside(self.path, SMOOTH_TRACKS_NAME)

    @property
    def artifacts(self) -> Path:
        return inside(self.path, ARTIFACTS_DIR_NAME)

    def artifact(self, name: str) -> Path:
        return inside(self.artifacts, name)

    def remove_intermediates(self) -> None:
        """Deletes what only a running job needs: tracks, temp files, half-received artifacts."""
        self.remove_tracks()
        shutil.rmtree(self.artifacts, ignore_errors=True)

    def remove_tracks(self) -> None:
        """Deletes the stored tracks (the SUCCEEDED job has them as an artifact) and temp files."""
        for path in (self.raw_tracks, self.smooth_tracks):
            path.unlink(missing_ok=True)
        self.remove_temp_files()

    def remove_temp_files(self) -> None:
        """Deletes temp files an atomic write left behind when its process died (`.name.*.tmp`)."""
        for path in self.path.glob(".*.tmp"):
            path.unlink(missing_ok=True)

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
