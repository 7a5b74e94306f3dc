"""Shared fixtures for the tracker tests: model files from the cache, test media, decoded frames.

Models come from the model cache (`make setup`); when they are missing the tests fail with that
instruction instead of skipping, so a CI run without models cannot pass silently.
"""

from __future__ import annotations

from pathlib import Path

# Before torch: the package sets OMP_WAIT_POLICY=PASSIVE, which only counts before torch loads.
from tracker_svc.model_setup import ModelPaths, model_paths  # isort: skip

import av
import numpy as np
import pytest
import torch

from tests.support import shared_file

REPO_ROOT = Path(__file__).resolve().parents[2]
RUNNER = REPO_ROOT / "mocap_common" / "demo" / "runner_1080p.mp4"  # ships with the product
STREET = REPO_ROOT.parent / "shared" / "media" / "street_720p.avi"  # ../shared only: skipped without it


@pytest.fixture(scope="session", autouse=True)
def torch_threads() -> None:
    # The machine has 2 cores shared with other work; keep timings and results reproducible.
    torch.set_num_threads(2)


@pytest.fixture(scope="session")
def models() -> ModelPaths:
    return model_paths()  # raises ModelsMissingError("... run `make setup` ...") when absent


def _media(path: Path) -> Path:
    if path == RUNNER and not path.is_file():
        pytest.fail(f"the demo clip {path} that ships with the repository is missing")
    return shared_file(path)


@pytest.fixture(scope="session")
def runner_path() -> Path:
    return _media(RUNNER)


@pytest.fixture(scope="session")
def street_path() -> Path:
    return _media(STREET)


def decode_frames(path: Path, indices: set[int]) -> dict[int, np.ndarray]:
    """RGB frames (H, W, 3) uint8 at the given decode indices."""
    frames = {}
    with av.open(str(path)) as container:
        for index, frame in enumerate(container.decode(video=0)):
            if index in indices:
                frames[index] = frame.to_ndarray(format="rgb24")
            if len(frames) == len(indices):
                break
    return frames
