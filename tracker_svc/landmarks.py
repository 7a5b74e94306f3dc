"""BlazePose GHUM 3D landmark model: 256×256 crops → 33 body landmarks in frame pixels and metres.

Post-processing follows MediaPipe's pose_landmark_by_roi graph:
- 39 points × (x, y, z, visibility, presence) in crop pixels; visibility and presence are logits
  (sigmoid applied here); points 33 and 34 are the alignment points for the next region.
- The pose flag output already ends in a LOGISTIC op inside the graph, so it is a probability;
  MediaPipe thresholds that value at 0.5 (checked against LiteRT in the parity tests).
- x, y are refined from the 64×64 heatmap (7×7 window, sigmoid confidences, only where the window's
  maximum is ≥ 0.5), then projected back through the region; z scales like x.
- World landmarks (metres, hip-centred) are rotated back by the region's rotation.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mocap_common.poses import NUM_LANDMARKS
from tracker_svc.roi import Rois, crop_frame, crop_to_frame, rois_from_alignment_points, rotate
from tracker_svc.tflite_torch import load_tflite

INPUT_SIZE = 256
HEATMAP_SIZE = 64
NUM_POINTS = 39  # 33 body + 2 alignment + 4 unused
ALIGNMENT_POINTS = (33, 34)  # centre and size/rotation point of the next region
PRESENCE_THRESHOLD = 0.5
HEATMAP_KERNEL = 7
HEATMAP_MIN_CONFIDENCE = 0.5

# Graph outputs the tracker needs (the segmentation mask is pruned: it is a third of the cost).
OUTPUT_LANDMARKS, OUTPUT_FLAG, OUTPUT_HEATMAP, OUTPUT_WORLD = "Identity", "Identity_1", "Identity_3", "Identity_4"


@dataclass
class LandmarkResult:
    """Landmarks of N crops, in frame coordinates."""

    image: np.ndarray  # (N, 33, 5) float32: x px, y px, z px, visibility, presence
    world: np.ndarray  # (N, 33, 3) float32 metres, rotated back to the frame's axes
    alignment: np.ndarray  # (N, 2, 2) float64: points 33 and 34 in frame pixels
    score: np.ndarray  # (N,) float32 pose presence probability

    @property
    def present(self) -> np.ndarray:
        return self.score >= PRESENCE_THRESHOLD

    def bounding_boxes(self) -> np.ndarray:
        """(N, 4) x_min, y_min, x_max, y_max of the 33 body landmarks."""
        xy = self.image[:, :, :2]
        return np.concatenate([xy.min(axis=1), xy.max(axis=1)], axis=1)

    def next_rois(self) -> Rois:
        """The regions MediaPipe would track with in the next frame."""
        return rois_from_alignment_points(self.alignment[:, 0], self.alignment[:, 1])


class LandmarkModel:
    """The landmark model on a device, with MediaPipe's crop and post-processing."""

    def __init__(self, model_path: Path | str, device: torch.device, *, refine_with_heatmap: bool = True) -> None:
        self.device = device
        self.refine_with_heatmap = refine_with_heatmap
        outputs = [OUTPUT_LANDMARKS, OUTPUT_FLAG, OUTPUT_WORLD]
        if refine_with_heatmap:
            outputs.insert(2, OUTPUT_HEATMAP)
        self.model = load_tflite(model_path, device, outputs=outputs)

    def preprocess(self, frame: torch.Tensor, rois: Rois) -> torch.Tensor:
        """(N, 3, 256, 256) crops in [0, 1] from one uint8 RGB frame (H, W, 3) on the device."""
        # Replicated border, MediaPipe's default for the landmark crop.
        return crop_frame(frame, rois, INPUT_SIZE, border="border") / 255.0

    def run(self, crops: torch.Tensor, rois: Rois) -> LandmarkResult:
        """Runs the model on (N, 3, 256, 256) crops taken from `rois` and decodes the outputs."""
        outputs = dict(zip(self.model.output_names, self.model(crops)))
        raw = outputs[OUTPUT_LANDMARKS].reshape(-1, NUM_POINTS, 5)
        xy = raw[..., :2]
        if self.refine_with_heatmap:
            xy = refine_from_heatmap(xy, outputs[OUTPUT_HEATMAP])
        return self._to_frame(
            xy.double().cpu().numpy(),
            raw[..., 2].double().cpu().numpy(),
            torch.sigmoid(raw[..., 3:5]).cpu().numpy(),
            outputs[OUTPUT_WORLD].reshape(-1, NUM_POINTS, 3).double().cpu().numpy(),
            outputs[OUTPUT_FLAG].reshape(-1).cpu().numpy(),
            rois,
        )

    @staticmethod
    def _to_frame(
        xy: np.ndarray, z: np.ndarray, vis_presence: np.ndarray, world: np.ndarray,
        score: np.ndarray, rois: Rois,
    ) -> LandmarkResult:
        frame_xy = crop_to_frame(rois, xy, INPUT_SIZE)
        frame_z = z / INPUT_SIZE * rois.size[:, None]
        body = slice(0, NUM_LANDMARKS)
        image = np.concatenate(
            [frame_xy[:, body], frame_z[:, body, None], vis_presence[:, body]], axis=-1
        ).astype(np.float32)
        world_xy = rotate(world[:, body, :2], rois.rotation)
        world_out = np.concatenate([world_xy, world[:, body, 2:]], axis=-1).astype(np.float32)
        alignment = frame_xy[:, list(ALIGNMENT_POINTS)]
        return LandmarkResult(image, world_out, alignment, score.astype(np.float32))


def refine_from_heatmap(xy: torch.Tensor, heatmap: torch.Tensor) -> torch.Tensor:
    """MediaPipe's RefineLandmarksFromHeatmap, batched.

    xy: (N, 39, 2) crop pixels; heatmap: (N, 64, 64, 39) logits (NHWC). For each point, the 7×7
    window of sigmoid confidences around its heatmap cell gives a confidence-weighted mean cell
    position, used when the window's maximum is ≥ 0.5. Cells outside the heatmap count as zero
    (MediaPipe shrinks the window). MediaPipe skips points whose column is outside the heatmap or
    whose row is negative (its row upper-bound check tests the column again); the same here.
    """
    n, k = xy.shape[:2]
    half = (HEATMAP_KERNEL - 1) // 2
    pad = 2 * half + 1  # room for a window centred up to `half` cells past the last row
    confidence = torch.sigmoid(heatmap.permute(0, 3, 1, 2))  # (N, 39, 64, 64)
    confidence = torch.nn.functional.pad(confidence, (pad, pad, pad, pad))
    cell = torch.trunc(xy / INPUT_SIZE * HEATMAP_SIZE).long()  # C++ float → int truncates
    col, row = cell[..., 0], cell[..., 1]
    eligible = (col >= 0) & (col < HEATMAP_SIZE) & (row >= 0)
    row = row.clamp(max=HEATMAP_SIZE + half)  # from there down the window is all padding anyway
    col = col.clamp(0, HEATMAP_SIZE - 1)
    offsets = torch.arange(-half, half + 1, device=xy.device)
    rows = row[..., None] + offsets  # (N, 39, 7) heatmap coordinates
    cols = col[..., None] + offsets
    n_index = torch.arange(n, device=xy.device)[:, None, None, None]
    k_index = torch.arange(k, device=xy.device)[None, :, None, None]
    window = confidence[n_index, k_index, (rows + pad)[..., :, None], (cols + pad)[..., None, :]]
    total = window.sum(dim=(2, 3))
    mean_col = (window * cols[..., None, :]).sum(dim=(2, 3)) / total.clamp(min=1e-12)
    mean_row = (window * rows[..., :, None]).sum(dim=(2, 3)) / total.clamp(min=1e-12)
    refine = eligible & (window.amax(dim=(2, 3)) >= HEATMAP_MIN_CONFIDENCE) & (total > 0)
    refined = torch.stack([mean_col, mean_row], dim=-1) * (INPUT_SIZE / HEATMAP_SIZE)
    return torch.where(refine[..., None], refined.to(xy.dtype), xy)
