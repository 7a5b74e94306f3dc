"""BlazePose person detector: letterboxed 224×224 input → scored boxes with 4 alignment keypoints.

Follows MediaPipe's pose_detection graph: SSD anchors (5 layers, strides 8/16/32/32/32, fixed size),
box and keypoint offsets divided by 224 and added to the anchor centre, score = sigmoid of the clipped
logit kept at ≥ 0.5, then weighted non-max suppression at IoU 0.3. Keypoints: 0 mid-hip centre,
1 full-body size/rotation point, 2 mid-shoulder centre, 3 upper-body size/rotation point.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tracker_svc.roi import Rois, crop_frame, crop_to_frame, letterbox_roi, rois_from_alignment_points
from tracker_svc.tflite_torch import load_tflite

INPUT_SIZE = 224
MIN_SCORE = 0.5
NMS_IOU = 0.3
SCORE_CLIP = 100.0
NUM_KEYPOINTS = 4

# SsdAnchorsCalculatorOptions of pose_detection_cpu.pbtxt.
_ANCHOR_STRIDES = (8, 16, 32, 32, 32)
_ANCHOR_OFFSET = 0.5
_ANCHORS_PER_LAYER = 2  # one aspect ratio (1.0) + the interpolated scale


@dataclass
class Detections:
    """Persons found in one frame, in frame pixels, best score first."""

    score: np.ndarray  # (K,)
    box: np.ndarray  # (K, 4) x_min, y_min, x_max, y_max of the detector's (face) box
    keypoints: np.ndarray  # (K, 4, 2)

    def __len__(self) -> int:
        return len(self.score)

    def body_rois(self) -> Rois:
        """The landmark model's regions: centred on the mid-hip, sized and turned by keypoint 1."""
        return rois_from_alignment_points(self.keypoints[:, 0], self.keypoints[:, 1])

    @classmethod
    def empty(cls) -> "Detections":
        return cls(np.zeros((0,)), np.zeros((0, 4)), np.zeros((0, NUM_KEYPOINTS, 2)))


def ssd_anchor_centers() -> np.ndarray:
    """(2254, 2) anchor centres in [0, 1]; layers with equal strides share one feature map."""
    centers = []
    layer = 0
    while layer < len(_ANCHOR_STRIDES):
        stride = _ANCHOR_STRIDES[layer]
        same = sum(1 for s in _ANCHOR_STRIDES[layer:] if s == stride)  # strides are sorted
        per_cell = _ANCHORS_PER_LAYER * same
        cells = math.ceil(INPUT_SIZE / stride)
        ys, xs = np.meshgrid(np.arange(cells), np.arange(cells), indexing="ij")
        grid = np.stack([(xs + _ANCHOR_OFFSET) / cells, (ys + _ANCHOR_OFFSET) / cells], axis=-1)
        centers.append(np.repeat(grid.reshape(-1, 2), per_cell, axis=0))
        layer += same
    return np.concatenate(centers)


class PoseDetector:
    """The detector model on a device, with MediaPipe's pre- and post-processing.

    Besides MediaPipe's single letterboxed view of the whole frame, a frame can be searched in
    several views (the whole frame plus square tiles): the model was trained on close-range
    persons and misses people who are small in a wide frame, while a tile shows them larger.
    """

    def __init__(self, model_path: Path | str, device: torch.device) -> None:
        self.device = device
        self.model = load_tflite(model_path, device)
        self.anchors = torch.from_numpy(ssd_anchor_centers()).float().to(device)

    def preprocess(self, frame: torch.Tensor, views: Rois | None = None) -> torch.Tensor:
        """(V, 3, 224, 224) inputs in [-1, 1] from one uint8 RGB frame (H, W, 3) on the device.

        views: square regions to look at; the letterboxed whole frame when None.
        """
        if views is None:
            views = letterbox_roi(frame.shape[1], frame.shape[0])
        crop = crop_frame(frame, views, INPUT_SIZE, border="zeros")
        return crop / 127.5 - 1.0  # black letterbox border → -1, as MediaPipe converts after warping

    def detect(self, inputs: torch.Tensor, views: Rois) -> list[Detections]:
        """Runs the model on (V, 3, 224, 224) inputs cut from `views`; detections in frame pixels."""
        raw_boxes, raw_scores = self.model(inputs)
        scores = torch.sigmoid(raw_scores[..., 0].clamp(-SCORE_CLIP, SCORE_CLIP))
        coords = self._decode(raw_boxes)
        results = []
        for v in range(len(views)):
            keep = torch.nonzero(scores[v] >= MIN_SCORE).squeeze(1)
            results.append(self._finish(
                scores[v, keep].cpu().numpy().astype(np.float64),
                coords[v, keep].cpu().numpy().astype(np.float64),
                views[[v]],
            ))
        return results

    def detect_frame(self, frame: torch.Tensor, tiles: int) -> Detections:
        """All persons in one frame: the whole frame plus `tiles` (≤ MAX_TILES) square tiles, merged by NMS."""
        views = detection_views(frame.shape[1], frame.shape[0], tiles)
        found = self.detect(self.preprocess(frame, views), views)
        return merge_detections(found)

    def _decode(self, raw: torch.Tensor) -> torch.Tensor:
        """(B, 2254, 12) offsets → (B, 2254, 6, 2) points in [0, 1] of the input.

        Point 0 is the box centre, point 1 the box size, points 2..5 the keypoints.
        """
        points = raw.reshape(raw.shape[0], raw.shape[1], 6, 2) / INPUT_SIZE
        offsets = torch.ones(6, 1, device=raw.device)
        offsets[1] = 0.0  # the size is not relative to the anchor centre
        return points + offsets * self.anchors[None, :, None, :]

    def _finish(self, scores: np.ndarray, coords: np.ndarray, view: Rois) -> Detections:
        if len(scores) == 0:
            return Detections.empty()
        center, size = coords[:, 0], coords[:, 1]
        corners = np.stack([center - size / 2, center + size / 2], axis=1)  # (K, 2, 2)
        points = np.concatenate([corners, coords[:, 2:]], axis=1) * INPUT_SIZE  # input pixels
        frame_points = crop_to_frame(view[[0] * len(scores)], points, INPUT_SIZE)
        boxes = frame_points[:, :2].reshape(-1, 4)
        return weighted_nms(scores, boxes, frame_points[:, 2:], NMS_IOU)


# The detector's work per frame is bounded: at most MAX_TILES tiles besides the whole frame, so a
# hostile 16000×16 clip costs what a 32:9 one does (uncapped, ceil(aspect) + 1 gave it 1 001 model
# inputs per detector run: minutes of tracker time and gigabytes of RSS). Five tiles of the short
# side cover every frame up to 4:1 exactly as before (16:9 → 3, 21:9 → 4, 32:9 → 5 tiles).
MAX_TILES = 5
# The widest frame those tiles cover at full resolution (the tracker refuses wider ones by default).
MAX_COVERED_ASPECT = float(MAX_TILES - 1)


def detection_views(width: int, height: int, tiles: int) -> Rois:
    """The letterboxed whole frame, then `tiles` (at most MAX_TILES) squares spread along the long side.

    The squares have the short side; past MAX_COVERED_ASPECT they grow to long side / 4 (the part
    outside the frame is letterboxed black) so that the capped count still spans the whole frame
    with the overlap a 4:1 frame gets. Up to 4:1 the views are exactly the uncapped ones.
    """
    views = [letterbox_roi(width, height)]
    tiles = min(tiles, MAX_TILES)
    if tiles > 0:
        long_side = max(width, height)
        side = max(float(min(width, height)), long_side / MAX_COVERED_ASPECT)
        starts = np.linspace(side / 2, long_side - side / 2, tiles)
        centers = np.stack([starts, np.full(tiles, height / 2)], 1) if width >= height \
            else np.stack([np.full(tiles, width / 2), starts], 1)
        views.append(Rois(centers, np.full(tiles, side), np.zeros(tiles)))
    return Rois.concatenate(views)


def auto_tiles(width: int, height: int) -> int:
    """Tiles for a frame: none when nearly square, else enough overlapping squares to cover it
    (capped at MAX_TILES)."""
    aspect = max(width, height) / min(width, height)
    return 0 if aspect < 1.2 else min(math.ceil(aspect) + 1, MAX_TILES)


def merge_detections(found: list[Detections]) -> Detections:
    """One list for several views: weighted NMS again over everything they found."""
    found = [d for d in found if len(d)]
    if not found:
        return Detections.empty()
    if len(found) == 1:
        return found[0]
    return weighted_nms(
        np.concatenate([d.score for d in found]),
        np.concatenate([d.box for d in found]),
        np.concatenate([d.keypoints for d in found]),
        NMS_IOU,
    )


def box_iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """IoU of one box (4,) with each of boxes (K, 4), all x_min, y_min, x_max, y_max."""
    ix = np.clip(np.minimum(box[2], boxes[:, 2]) - np.maximum(box[0], boxes[:, 0]), 0, None)
    iy = np.clip(np.minimum(box[3], boxes[:, 3]) - np.maximum(box[1], boxes[:, 1]), 0, None)
    inter = ix * iy
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    union = area + areas - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def weighted_nms(scores: np.ndarray, boxes: np.ndarray, keypoints: np.ndarray, iou_threshold: float) -> Detections:
    """MediaPipe's WEIGHTED non-max suppression.

    Repeatedly takes the best remaining detection and every remaining one overlapping it by more
    than the threshold (itself included); the output is their score-weighted average box and
    keypoints, with the best one's score.
    """
    order = np.argsort(-scores, kind="stable")
    remaining = order
    out_scores, out_boxes, out_points = [], [], []
    while len(remaining):
        best = remaining[0]
        overlaps = box_iou(boxes[best], boxes[remaining]) > iou_threshold
        overlaps[0] = True  # the best one always absorbs itself, even with a degenerate box
        members = remaining[overlaps]
        weights = scores[members] / scores[members].sum()
        out_scores.append(scores[best])
        out_boxes.append(weights @ boxes[members])
        out_points.append(np.tensordot(weights, keypoints[members], axes=1))
        remaining = remaining[~overlaps]
    return Detections(np.array(out_scores), np.array(out_boxes), np.array(out_points))
