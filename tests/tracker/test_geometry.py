"""Regions, crops and detector post-processing against independent reference implementations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tracker_svc.detector import Detections, detection_views, ssd_anchor_centers, weighted_nms
from tracker_svc.roi import Rois, crop_frame, crop_to_frame, letterbox_roi, rois_from_alignment_points


def _warp_reference(image: np.ndarray, center: tuple[float, float], size: float, rotation: float, out: int,
                    border: str) -> np.ndarray:
    """MediaPipe's OpenCV crop written out: cv::boxPoints of the rotated rect, the perspective map
    that sends its corners to (0, out)…(out, out), and bilinear sampling (pixel centres at integers)
    with BORDER_REPLICATE or BORDER_CONSTANT(0)."""
    cx, cy = center
    b, a = math.cos(rotation) * 0.5, math.sin(rotation) * 0.5
    # cv::RotatedRect::points, angle in degrees = rotation; size = (w, h) = (size, size)
    p0 = (cx - a * size - b * size, cy + b * size - a * size)  # bottom-left  → (0, out)
    p1 = (cx + a * size - b * size, cy - b * size - a * size)  # top-left     → (0, 0)
    p2 = (2 * cx - p0[0], 2 * cy - p0[1])                        # top-right    → (out, 0)
    # affine map dst → src through the three corners
    src = np.array([p1, p2, p0], np.float64)
    dst = np.array([[0, 0], [out, 0], [0, out]], np.float64)
    matrix = np.linalg.solve(np.c_[dst, np.ones(3)], src)  # (3, 2): [x, y, 1] @ matrix = src
    jj, ii = np.meshgrid(np.arange(out), np.arange(out), indexing="ij")
    coords = np.stack([ii, jj, np.ones_like(ii)], -1).reshape(-1, 3) @ matrix
    return _bilinear(image.astype(np.float64), coords[:, 0], coords[:, 1], border).reshape(out, out, -1)


def _bilinear(image: np.ndarray, x: np.ndarray, y: np.ndarray, border: str) -> np.ndarray:
    height, width = image.shape[:2]
    x0, y0 = np.floor(x).astype(int), np.floor(y).astype(int)
    fx, fy = (x - x0)[:, None], (y - y0)[:, None]

    def tap(yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
        if border == "border":
            return image[np.clip(yy, 0, height - 1), np.clip(xx, 0, width - 1)]
        inside = (xx >= 0) & (xx < width) & (yy >= 0) & (yy < height)
        values = image[np.clip(yy, 0, height - 1), np.clip(xx, 0, width - 1)]
        return values * inside[:, None]

    top = tap(y0, x0) * (1 - fx) + tap(y0, x0 + 1) * fx
    bottom = tap(y0 + 1, x0) * (1 - fx) + tap(y0 + 1, x0 + 1) * fx
    return top * (1 - fy) + bottom * fy


@pytest.mark.parametrize("border", ["border", "zeros"])
@pytest.mark.parametrize(("center", "size", "rotation"), [
    ((80.0, 60.0), 90.0, 0.0),
    ((70.3, 41.7), 120.0, 0.6),  # rotated, partly outside the frame
    ((10.0, 100.0), 64.0, -2.5),
])
def test_crop_matches_warp_reference(border: str, center: tuple[float, float], size: float, rotation: float) -> None:
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, size=(120, 160, 3), dtype=np.uint8)
    rois = Rois(np.array([center]), np.array([size]), np.array([rotation]))
    ours = crop_frame(torch.from_numpy(image), rois, 32, border)[0].permute(1, 2, 0).numpy()
    expected = _warp_reference(image, center, size, rotation, 32, border)
    np.testing.assert_allclose(ours, expected, atol=2e-3 * 255)


def test_crop_and_projection_are_inverse() -> None:
    rois = Rois(np.array([[300.0, 200.0]]), np.array([150.0]), np.array([0.4]))
    crop_points = np.array([[[0.0, 0.0], [128.0, 128.0], [255.0, 10.0]]])
    frame_points = crop_to_frame(rois, crop_points, 256)
    # the crop centre is the region centre; a corner sits half a diagonal away
    np.testing.assert_allclose(frame_points[0, 1], [300.0, 200.0])
    assert np.linalg.norm(frame_points[0, 0] - [300.0, 200.0]) == pytest.approx(150.0 / math.sqrt(2))


def test_region_from_alignment_points() -> None:
    # scale point straight above the centre: upright person, no rotation, side = 2·distance·1.25
    rois = rois_from_alignment_points(np.array([[100.0, 200.0]]), np.array([[100.0, 120.0]]))
    assert rois.rotation[0] == pytest.approx(0.0)
    assert rois.size[0] == pytest.approx(200.0)
    # scale point to the right: the body lies along +x, rotated by +90° (clockwise on screen)
    rois = rois_from_alignment_points(np.array([[100.0, 200.0]]), np.array([[180.0, 200.0]]))
    assert rois.rotation[0] == pytest.approx(math.pi / 2)


def test_ssd_anchors() -> None:
    anchors = ssd_anchor_centers()
    assert anchors.shape == (2254, 2)
    # first layer: 28×28 cells, 2 anchors each, centres at (x + 0.5) / 28
    np.testing.assert_allclose(anchors[:2], [[0.5 / 28, 0.5 / 28]] * 2)
    np.testing.assert_allclose(anchors[2], [1.5 / 28, 0.5 / 28])
    # last block: 7×7 cells with 6 anchors (three stride-32 layers merged)
    np.testing.assert_allclose(anchors[-1], [6.5 / 7, 6.5 / 7])
    assert np.all(anchors[-6:] == anchors[-1])


def test_weighted_nms_averages_overlapping_boxes() -> None:
    scores = np.array([0.9, 0.6, 0.8])
    boxes = np.array([[0, 0, 10, 10], [1, 1, 11, 11], [50, 50, 60, 60]], np.float64)
    keypoints = np.array([[[0, 0]] * 4, [[3, 3]] * 4, [[9, 9]] * 4], np.float64)
    result = weighted_nms(scores, boxes, keypoints, 0.3)
    assert len(result) == 2
    assert result.score.tolist() == [0.9, 0.8]  # the best member's score, not an average
    np.testing.assert_allclose(result.box[0], (0.9 * boxes[0] + 0.6 * boxes[1]) / 1.5)
    np.testing.assert_allclose(result.keypoints[0, 0], [1.2, 1.2])
    np.testing.assert_allclose(result.box[1], boxes[2])


def test_detection_views_cover_the_frame() -> None:
    views = detection_views(1280, 720, 3)
    assert len(views) == 4
    np.testing.assert_allclose(views.size, [1280, 720, 720, 720])
    np.testing.assert_allclose(views.center[1:, 0], [360, 640, 920])
    np.testing.assert_allclose(letterbox_roi(1280, 720).center, [[640, 360]])


def test_detections_give_body_regions() -> None:
    detections = Detections(
        score=np.array([0.9]), box=np.zeros((1, 4)),
        keypoints=np.array([[[100.0, 300.0], [100.0, 200.0], [0, 0], [0, 0]]]),
    )
    rois = detections.body_rois()
    np.testing.assert_allclose(rois.center, [[100.0, 300.0]])
    assert rois.size[0] == pytest.approx(250.0)
