"""The tracker on CUDA (run where a GPU is present: `pytest -m gpu`; skipped elsewhere).

Same parity limits as on the CPU (tests/tracker/test_parity.py), the runner clip tracked on the
GPU, and device memory back to where it was once the tracker is closed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tests.tracker.test_parity import (
    DETECTOR_BOX_TOL,
    DETECTOR_LOGIT_TOL,
    LANDMARK_LOGIT_TOL,
    LANDMARK_XYZ_TOL,
    WORLD_TOL,
    _litert,
    detector_inputs,  # noqa: F401 - fixtures shared with the CPU parity tests
    frames,  # noqa: F401
    landmark_inputs,  # noqa: F401
)
from tracker_svc.model_setup import ModelPaths
from tracker_svc.pipeline import PoseTracker
from tracker_svc.tflite_torch import load_tflite

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.fixture(autouse=True)
def exact_fp32():
    # TF32 convolutions would trade parity for speed; the tracker runs true fp32.
    previous = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = previous


def _run_cuda(path: Path, inputs: torch.Tensor) -> dict[str, np.ndarray]:
    module = load_tflite(path, "cuda")
    with torch.inference_mode():
        outputs = module(inputs.to("cuda"))
    return {name: out.cpu().numpy() for name, out in zip(module.output_names, outputs)}


def test_detector_on_cuda_matches_litert(models: ModelPaths, detector_inputs: torch.Tensor) -> None:  # noqa: F811
    ours = _run_cuda(models.detector, detector_inputs)
    reference = _litert(models.detector, detector_inputs.permute(0, 2, 3, 1).contiguous().numpy())
    for name, tolerance in (("Identity", DETECTOR_BOX_TOL), ("Identity_1", DETECTOR_LOGIT_TOL)):
        expected = np.concatenate([r[name] for r in reference])
        assert np.abs(ours[name] - expected).max() <= tolerance, name


def test_landmark_model_on_cuda_matches_litert(models: ModelPaths, landmark_inputs: torch.Tensor) -> None:  # noqa: F811
    ours = _run_cuda(models.landmark, landmark_inputs)
    reference = _litert(models.landmark, landmark_inputs.permute(0, 2, 3, 1).contiguous().numpy())
    points = ours["Identity"].reshape(-1, 39, 5)
    expected = np.concatenate([r["Identity"] for r in reference]).reshape(-1, 39, 5)
    assert np.abs(points[..., :3] - expected[..., :3]).max() <= LANDMARK_XYZ_TOL
    assert np.abs(points[..., 3:] - expected[..., 3:]).max() <= LANDMARK_LOGIT_TOL
    world = np.concatenate([r["Identity_4"] for r in reference])
    assert np.abs(ours["Identity_4"] - world).max() <= WORLD_TOL


def test_runner_tracked_on_cuda_frees_device_memory(models: ModelPaths, runner_path: Path) -> None:
    torch.cuda.synchronize()
    baseline = torch.cuda.memory_allocated()
    tracker = PoseTracker(models, device="cuda")
    tracks = tracker.track_to_set(runner_path)
    tracker.close()
    del tracker
    torch.cuda.synchronize()
    assert len(tracks.tracks) == 1 and len(tracks.tracks[0]) >= 175
    assert torch.cuda.memory_allocated() <= baseline
