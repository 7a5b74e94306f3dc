"""The torch port of both BlazePose graphs against LiteRT, on real frames preprocessed as the pipeline does.

Detector inputs are the letterboxed 224×224 frames in [-1, 1]; landmark inputs are 256×256 crops in
[0, 1] around the detector's real detections. Each output tensor of both graphs is compared; the
torch side runs all samples as one batch (LiteRT one at a time), so batching is covered too.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from ai_edge_litert.interpreter import Interpreter
from scipy.special import expit

from tests.tracker.conftest import decode_frames
from tracker_svc.detector import PoseDetector
from tracker_svc.landmarks import LandmarkModel
from tracker_svc.model_setup import ModelPaths
from tracker_svc.roi import Rois, letterbox_roi
from tracker_svc.tflite_torch import load_tflite

# Tolerances: max absolute error over every element. Measured on these frames, worst of the two
# layouts (torch 2.13 CPU vs LiteRT 2.3 XNNPACK): boxes 2.0e-3, score logits 8.9e-4, landmark
# x/y/z 2.6e-3 px, vis/presence logits 1.2e-4, flag 3.2e-5, heatmap 3.4e-4, world 2.8e-5 m,
# segmentation 0.44 (see -s output). The limits leave ~3-5x room for other CPUs and kernels, not
# for bugs: a wrong op, layout, padding or weight moves these outputs by whole units.
DETECTOR_BOX_TOL = 5e-3  # box/keypoint offsets, 224-px input units (values up to ~200)
DETECTOR_LOGIT_TOL = 5e-3  # score logits (values up to ~±100)
LANDMARK_XYZ_TOL = 0.01  # landmark x, y, z in 256-crop pixels
LANDMARK_LOGIT_TOL = 1e-3  # visibility / presence logits
POSE_FLAG_TOL = 1e-4  # presence probability (sigmoid inside the graph)
HEATMAP_TOL = 2e-3  # heatmap logits
WORLD_TOL = 2e-4  # world landmarks, metres
# The segmentation head (unused by the tracker, pruned there) reaches logits of ~±1700 through a
# chain of 256×256 layers with large weights, so fp32 summation-order differences grow to ~0.3-0.7
# absolute (4e-4 relative). Each op alone matches LiteRT to 2e-5 relative when replayed in
# float64 on LiteRT's own intermediate tensors, so the port matches op by op; the limits are
# relative to the range, plus the mask itself (sigmoid of the logits).
SEGMENTATION_REL_TOL = 2e-3  # max abs error / max |logit|
SEGMENTATION_MASK_TOL = 1e-2  # mask probability

FRAMES = {"runner": (0, 90, 179), "street": (0, 100, 200)}


def _litert(path: Path, inputs_nhwc: np.ndarray) -> list[dict[str, np.ndarray]]:
    interpreter = Interpreter(model_path=str(path), num_threads=2)
    interpreter.allocate_tensors()
    input_index = interpreter.get_input_details()[0]["index"]
    results = []
    for sample in inputs_nhwc:
        interpreter.set_tensor(input_index, sample[None])
        interpreter.invoke()
        results.append({o["name"]: interpreter.get_tensor(o["index"]).copy() for o in interpreter.get_output_details()})
    return results


def _compare(module_outputs: dict[str, torch.Tensor], reference: list[dict[str, np.ndarray]]) -> dict[str, float]:
    errors = {}
    for name, ours in module_outputs.items():
        expected = np.concatenate([r[name] for r in reference])
        assert ours.shape == expected.shape, name
        errors[name] = float(np.abs(ours.numpy() - expected).max())
    return errors


@pytest.fixture(scope="module")
def frames(runner_path: Path, street_path: Path) -> list[torch.Tensor]:
    decoded = [*decode_frames(runner_path, set(FRAMES["runner"])).values(),
               *decode_frames(street_path, set(FRAMES["street"])).values()]
    return [torch.from_numpy(f) for f in decoded]


@pytest.fixture(scope="module")
def detector_inputs(models: ModelPaths, frames: list[torch.Tensor]) -> torch.Tensor:
    detector = PoseDetector(models.detector, torch.device("cpu"))
    return torch.cat([detector.preprocess(f) for f in frames])


@pytest.fixture(scope="module")
def landmark_inputs(models: ModelPaths, frames: list[torch.Tensor], detector_inputs: torch.Tensor) -> torch.Tensor:
    detector = PoseDetector(models.detector, torch.device("cpu"))
    landmarks = LandmarkModel(models.landmark, torch.device("cpu"))
    views = Rois.concatenate([letterbox_roi(f.shape[1], f.shape[0]) for f in frames])
    with torch.inference_mode():
        detections = detector.detect(detector_inputs, views)
    crops = []
    for frame, found in zip(frames, detections):
        assert len(found), "every test frame shows at least one detectable person"
        rois: Rois = found.body_rois()
        crops.append(landmarks.preprocess(frame, rois))
    return torch.cat(crops)


# The CPU default (channels_last memory) and the NCHW layout CUDA runs.
LAYOUTS = pytest.mark.parametrize("channels_last", [True, False], ids=["channels-last", "nchw"])


@LAYOUTS
def test_detector_matches_litert(models: ModelPaths, detector_inputs: torch.Tensor, channels_last: bool) -> None:
    module = load_tflite(models.detector, "cpu", channels_last=channels_last)
    with torch.inference_mode():
        ours = dict(zip(module.output_names, module(detector_inputs)))
    reference = _litert(models.detector, detector_inputs.permute(0, 2, 3, 1).contiguous().numpy())
    errors = _compare(ours, reference)
    print("detector max abs error:", errors)
    assert errors["Identity"] <= DETECTOR_BOX_TOL
    assert errors["Identity_1"] <= DETECTOR_LOGIT_TOL


@LAYOUTS
def test_landmark_model_matches_litert(models: ModelPaths, landmark_inputs: torch.Tensor, channels_last: bool) -> None:
    module = load_tflite(models.landmark, "cpu", channels_last=channels_last)  # all five outputs
    with torch.inference_mode():
        ours = dict(zip(module.output_names, module(landmark_inputs)))
    reference = _litert(models.landmark, landmark_inputs.permute(0, 2, 3, 1).contiguous().numpy())
    errors = _compare(ours, reference)
    print("landmark max abs error:", errors)
    points = ours["Identity"].reshape(-1, 39, 5).numpy()
    expected = np.concatenate([r["Identity"] for r in reference]).reshape(-1, 39, 5)
    assert np.abs(points[..., :3] - expected[..., :3]).max() <= LANDMARK_XYZ_TOL
    assert np.abs(points[..., 3:] - expected[..., 3:]).max() <= LANDMARK_LOGIT_TOL
    assert errors["Identity_1"] <= POSE_FLAG_TOL
    assert errors["Identity_3"] <= HEATMAP_TOL
    assert errors["Identity_4"] <= WORLD_TOL
    segmentation = ours["Identity_2"].numpy()
    expected_segmentation = np.concatenate([r["Identity_2"] for r in reference])
    assert errors["Identity_2"] <= SEGMENTATION_REL_TOL * np.abs(expected_segmentation).max()
    mask_error = np.abs(_sigmoid(segmentation) - _sigmoid(expected_segmentation)).max()
    assert mask_error <= SEGMENTATION_MASK_TOL


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return expit(x.astype(np.float64))


def test_pose_flag_is_already_a_probability(models: ModelPaths, landmark_inputs: torch.Tensor) -> None:
    """Settles which value MediaPipe thresholds at 0.5: the graph's own LOGISTIC output.

    LiteRT's flag output lies in [0, 1] and equals our output, so no second sigmoid is applied;
    real persons score near 1 and an empty crop near 0.
    """
    reference = _litert(models.landmark, landmark_inputs.permute(0, 2, 3, 1).contiguous().numpy())
    flags = np.array([r["Identity_1"].item() for r in reference])
    assert np.all((flags >= 0) & (flags <= 1))
    assert np.all(flags > 0.5)
    empty = _litert(models.landmark, np.zeros((1, 256, 256, 3), np.float32))[0]["Identity_1"].item()
    assert empty < 0.5
