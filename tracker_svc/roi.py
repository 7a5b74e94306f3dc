"""Regions of interest: rotated squares in frame pixels, and the batched crops taken from them.

Coordinates follow MediaPipe (and OpenCV): pixel centres sit at integer coordinates, x right, y
down, so `x_px = x_normalized · width`. A region is a square of side `size` centred at `center`,
rotated by `rotation` radians (clockwise on screen, as `cv::RotatedRect`).

The crop reproduces MediaPipe's ImageToTensorCalculator on the CPU: `cv::warpPerspective` (bilinear)
mapping the region's corners onto the corners of the output tensor, i.e. output pixel (i, j) samples
`center + R(rotation) · ((i / out − ½) · size, (j / out − ½) · size)`. It is done for a whole batch of
regions with one `F.grid_sample` call per frame.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

# MediaPipe's pose_{detection,landmarks}_to_roi graphs: region = 2·|kp1 − kp0|, enlarged by 1.25.
ROI_SCALE = 1.25
# The vector kp0 → kp1 is rotated to point up (90°) in the crop.
TARGET_ANGLE = math.pi / 2


@dataclass
class Rois:
    """N rotated square regions in frame pixels."""

    center: np.ndarray  # (N, 2) float64: x, y
    size: np.ndarray  # (N,) float64: side length
    rotation: np.ndarray  # (N,) float64 radians, in [-π, π)

    def __len__(self) -> int:
        return len(self.size)

    def __getitem__(self, index: np.ndarray | slice | list[int]) -> "Rois":
        return Rois(self.center[index], self.size[index], self.rotation[index])

    @classmethod
    def empty(cls) -> "Rois":
        return cls(np.zeros((0, 2)), np.zeros((0,)), np.zeros((0,)))

    @classmethod
    def concatenate(cls, parts: list["Rois"]) -> "Rois":
        if not parts:
            return cls.empty()
        return cls(
            np.concatenate([p.center for p in parts]),
            np.concatenate([p.size for p in parts]),
            np.concatenate([p.rotation for p in parts]),
        )

    def bounding_boxes(self) -> np.ndarray:
        """(N, 4) axis-aligned boxes x_min, y_min, x_max, y_max enclosing each rotated square."""
        half = 0.5 * self.size * (np.abs(np.cos(self.rotation)) + np.abs(np.sin(self.rotation)))
        return np.stack([
            self.center[:, 0] - half, self.center[:, 1] - half,
            self.center[:, 0] + half, self.center[:, 1] + half,
        ], axis=1)


def normalize_radians(angle: np.ndarray) -> np.ndarray:
    """Maps angles to [-π, π), as MediaPipe's NormalizeRadians."""
    return angle - 2 * np.pi * np.floor((angle + np.pi) / (2 * np.pi))


def rois_from_alignment_points(center: np.ndarray, scale_point: np.ndarray, scale: float = ROI_SCALE) -> Rois:
    """MediaPipe's AlignmentPointsRectsCalculator + RectTransformationCalculator(scale, square_long).

    center, scale_point: (N, 2) pixels. The region is centred on `center`, its side is twice the
    distance to `scale_point` times `scale`, and it is rotated so that center → scale_point points up.
    """
    delta = np.asarray(scale_point, np.float64) - np.asarray(center, np.float64)
    size = 2.0 * np.hypot(delta[:, 0], delta[:, 1]) * scale
    rotation = normalize_radians(TARGET_ANGLE - np.arctan2(-delta[:, 1], delta[:, 0]))
    return Rois(np.asarray(center, np.float64).copy(), size, rotation)


def letterbox_roi(width: int, height: int) -> Rois:
    """The whole frame padded to a square (keep-aspect-ratio resize with letterboxing)."""
    return Rois(np.array([[width / 2.0, height / 2.0]]), np.array([float(max(width, height))]), np.zeros(1))


def crop_to_frame(rois: Rois, points: np.ndarray, out_size: int) -> np.ndarray:
    """Maps points in crop pixels (N, K, 2) back to frame pixels, the inverse of the crop."""
    local = (points / out_size - 0.5) * rois.size[:, None, None]
    return rotate(local, rois.rotation) + rois.center[:, None, :]


def rotate(vectors: np.ndarray, rotation: np.ndarray) -> np.ndarray:
    """Rotates (N, K, 2) vectors by (N,) angles (x' = cos·x − sin·y, y' = sin·x + cos·y)."""
    cos, sin = np.cos(rotation)[:, None], np.sin(rotation)[:, None]
    x, y = vectors[..., 0], vectors[..., 1]
    return np.stack([cos * x - sin * y, sin * x + cos * y], axis=-1)


def crop_theta(rois: Rois, frame_width: int, frame_height: int, out_size: int) -> torch.Tensor:
    """(N, 2, 3) affine matrices for `F.affine_grid(..., align_corners=False)`.

    affine_grid gives output pixel i the normalised coordinate x_n = (2i + 1)/out − 1, so the crop
    offset (i/out − ½)·size equals size/2 · x_n − size/(2·out). The source point is then converted
    from pixel-centre coordinates to grid_sample's normalised ones: 2·(x + ½)/W − 1.
    """
    cos, sin = np.cos(rois.rotation), np.sin(rois.rotation)
    half = rois.size / 2.0
    shift = -rois.size / (2.0 * out_size)  # the same for x and y
    # src = center + R · (half·x_n + shift, half·y_n + shift)
    a = np.stack([half * cos, -half * sin], axis=1)
    b = np.stack([half * sin, half * cos], axis=1)
    tx = rois.center[:, 0] + shift * (cos - sin)
    ty = rois.center[:, 1] + shift * (sin + cos)
    # to grid_sample coordinates
    sx, sy = 2.0 / frame_width, 2.0 / frame_height
    theta = np.empty((len(rois), 2, 3))
    theta[:, 0, :2] = a * sx
    theta[:, 0, 2] = (tx + 0.5) * sx - 1.0
    theta[:, 1, :2] = b * sy
    theta[:, 1, 2] = (ty + 0.5) * sy - 1.0
    return torch.from_numpy(theta).float()


def sample_crops(frame: torch.Tensor, rois: Rois, out_size: int, border: str) -> torch.Tensor:
    """Bilinear crops (N, C, out, out) of one float frame (1, C, H, W), values as in the frame.

    border: "zeros" (letterbox: black outside the frame) or "border" (replicate the edge pixels,
    MediaPipe's default for the landmark crop).
    """
    n = len(rois)
    _, c, height, width = frame.shape
    theta = crop_theta(rois, width, height, out_size).to(frame.device)
    # affine_grid, written as two broadcast sums: several times faster for a handful of crops.
    base = (2 * torch.arange(out_size, device=frame.device, dtype=torch.float32) + 1) / out_size - 1
    x_n, y_n = base[None, None, :], base[None, :, None]  # output column / row coordinates
    t = theta[:, :, :, None, None]
    grid = torch.stack([t[:, 0, 0] * x_n + t[:, 0, 1] * y_n + t[:, 0, 2],
                        t[:, 1, 0] * x_n + t[:, 1, 1] * y_n + t[:, 1, 2]], dim=-1)
    return F.grid_sample(frame.expand(n, -1, -1, -1), grid, mode="bilinear", padding_mode=border, align_corners=False)


def crop_frame(pixels: torch.Tensor, rois: Rois, out_size: int, border: str) -> torch.Tensor:
    """`sample_crops` straight from a uint8 frame (H, W, 3): float crops (N, 3, out, out) in [0, 255].

    Only the part of the frame the regions cover (plus a pixel for the bilinear taps) is converted
    to float: converting a whole 1080p frame costs more than the crops themselves. Everything
    sampled outside that part is outside the frame, so the border rule is unchanged.
    """
    height, width = pixels.shape[:2]
    boxes = rois.bounding_boxes()
    x0 = int(np.clip(np.floor(boxes[:, 0].min()) - 2, 0, width - 1))
    y0 = int(np.clip(np.floor(boxes[:, 1].min()) - 2, 0, height - 1))
    x1 = int(np.clip(np.ceil(boxes[:, 2].max()) + 3, x0 + 1, width))
    y1 = int(np.clip(np.ceil(boxes[:, 3].max()) + 3, y0 + 1, height))
    region = pixels[y0:y1, x0:x1].permute(2, 0, 1)[None].float()
    shifted = Rois(rois.center - np.array([[x0, y0]]), rois.size, rois.rotation)
    return sample_crops(region, shifted, out_size, border)
