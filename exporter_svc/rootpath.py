"""The performer's path through space, estimated from where the body is in the image.

BlazePose's world landmarks are hip-centred: they say how the body is posed, not where it is. For
ROOT_MOTION_PATH the hip centre's position relative to the camera is estimated per frame with a
pinhole model:

- Assumptions: a static camera, no lens distortion, the principal point at the image centre, square
  pixels, and a nominal horizontal field of view of NOMINAL_HFOV_DEG (60°, a typical phone or
  webcam lens; the true lens is unknown). A wrong field of view scales depth (and so the length of
  the path) by tan(60°/2) / tan(true/2), but not the path's shape.
- Depth: the world landmarks are metric and in camera-aligned axes, so the ratio of their x-y
  extent to the same segments' extent in pixels gives metres per pixel at the person's depth:
  depth Z = f · Σ|Δworld_xy| / Σ|Δpixel| over torso and leg segments whose ends are visible.
  Depth is noisy (a few % per frame), so it gets a running median over 0.5 s and a Gaussian of
  0.25 s.
- Position: X = (u − cx) · Z / f, Y = (v − cy) · Z / f for the hip centre's pixel (u, v) (smoothed
  with a Gaussian of 2 frames), in camera axes (x right, y down, z away), metres.

Frames where no segment is visible take the depth of their neighbours.

That path is then made consistent with the feet (`refine_path_with_feet`, called by the solve on a
levelled floor): from frame to frame the hips move so that a standing foot stays put, while over
seconds the path follows the image. This also corrects most of a wrong field of view's scale.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.ndimage import gaussian_filter1d, median_filter

NOMINAL_HFOV_DEG = 60.0
VISIBLE = 0.5
DEPTH_MEDIAN_S = 0.5
DEPTH_SMOOTH_S = 0.25
PIXEL_SMOOTH_FRAMES = 2.0
# Segments whose apparent length gives the scale: torso sides, hips, shoulders, thighs, shins.
_SCALE_SEGMENTS = ((11, 12), (23, 24), (11, 23), (12, 24), (23, 25), (24, 26), (25, 27), (26, 28))


def focal_length_px(width: int, hfov_deg: float = NOMINAL_HFOV_DEG) -> float:
    return (width / 2.0) / math.tan(math.radians(hfov_deg) / 2.0)


def estimate_root_path(image: np.ndarray, world: np.ndarray, width: int, height: int, fps: float,
                       hfov_deg: float = NOMINAL_HFOV_DEG) -> np.ndarray | None:
    """(F, 3) hip-centre positions in camera axes (metres), or None when the video size is unknown
    or no frame shows a usable segment."""
    if width <= 0 or height <= 0 or len(image) == 0:
        return None
    f = focal_length_px(width, hfov_deg)
    visible = image[..., 3] >= VISIBLE
    world_len = np.zeros(len(image))
    pixel_len = np.zeros(len(image))
    for a, b in _SCALE_SEGMENTS:
        ok = visible[:, a] & visible[:, b]
        world_len += np.where(ok, np.linalg.norm(world[:, a, :2] - world[:, b, :2], axis=-1), 0.0)
        pixel_len += np.where(ok, np.linalg.norm(image[:, a, :2] - image[:, b, :2], axis=-1), 0.0)
    usable = pixel_len > 1.0
    if not usable.any():
        return None
    depth = np.full(len(image), np.nan)
    depth[usable] = f * world_len[usable] / pixel_len[usable]
    frames = np.arange(len(image))
    depth = np.interp(frames, frames[usable], depth[usable])
    depth = median_filter(depth, size=max(1, int(round(DEPTH_MEDIAN_S * fps)) | 1), mode="nearest")
    depth = gaussian_filter1d(depth, max(DEPTH_SMOOTH_S * fps, 0.5), mode="nearest")
    hips_px = 0.5 * (image[:, 23, :2] + image[:, 24, :2]).astype(np.float64)
    hips_px = gaussian_filter1d(hips_px, PIXEL_SMOOTH_FRAMES, axis=0, mode="nearest")
    x = (hips_px[:, 0] - width / 2.0) * depth / f
    y = (hips_px[:, 1] - height / 2.0) * depth / f
    return np.stack([x, y, depth], axis=-1)


# --- the path made consistent with the feet -----------------------------------------------------

FOOT_POINTS = (29, 31, 30, 32)  # heels and toe tips
LOW_M = 0.05  # a foot point within this of its lowest level may be standing
STANCE_SPEED_M_S = 1.5  # … if, on the image path, it moves slower than this
SMOOTH_S = 0.04
DRIFT_S = 1.0  # time scale on which the image path overrides the feet


def refine_path_with_feet(body: np.ndarray, fps: float) -> tuple[np.ndarray, float]:
    """Re-times the image-estimated path so that standing feet stand still.

    `body`: (F, 33, 3) landmarks in body axes on a levelled floor (y up), placed on the image-based
    path. Depth from apparent size is too noisy (and scaled by the assumed field of view) for a
    foot in contact to stay put, so locking would not even find the contacts. Where a foot point
    is near the floor and, on the image path, slower than STANCE_SPEED_M_S, the slowest such point
    is taken to be standing and the hips' horizontal velocity becomes minus that point's velocity
    relative to the hips (metric, from the world landmarks); elsewhere the image path's velocity is
    kept. The integrated path follows the feet from frame to frame and the image path over
    seconds (a complementary filter: the difference is low-passed with a Gaussian of DRIFT_S).
    Returns the shifted landmarks and the share of frames driven by a standing foot.
    """
    frames = len(body)
    if frames < 3:
        return body, 0.0
    sigma = max(SMOOTH_S * fps, 0.5)
    hips = 0.5 * (body[:, 23] + body[:, 24])
    relative = gaussian_filter1d(body[:, FOOT_POINTS] - hips[:, None], sigma, axis=0, mode="nearest")[..., 0::2]
    hips_xz = hips[:, 0::2]
    image_velocity = np.gradient(gaussian_filter1d(hips_xz, sigma, axis=0, mode="nearest"), axis=0) * fps
    relative_velocity = np.gradient(relative, axis=0) * fps  # (F, 4, 2)
    ground_speed = np.linalg.norm(image_velocity[:, None] + relative_velocity, axis=-1)
    heights = body[:, FOOT_POINTS, 1]
    low = heights < np.percentile(heights, 5, axis=0) + LOW_M
    standing = low & (ground_speed < STANCE_SPEED_M_S)
    driven = standing.any(axis=1)
    slowest = np.argmin(np.where(standing, ground_speed, np.inf), axis=1)
    velocity = np.where(driven[:, None], -relative_velocity[np.arange(frames), slowest], image_velocity)
    path = hips_xz[0] + np.concatenate([[np.zeros(2)], np.cumsum(0.5 * (velocity[1:] + velocity[:-1]), axis=0) / fps])
    path = path + gaussian_filter1d(hips_xz - path, max(DRIFT_S * fps, 0.5), axis=0, mode="nearest")
    shifted = body.copy()
    shifted[..., 0::2] += (path - hips_xz)[:, None, :]
    return shifted, float(driven.mean())
