"""The detector's tiles: unchanged for every common format, capped for extreme aspect ratios (a
16000×16 upload once cost 1 001 tiles per detector run: minutes of tracker time, 6 GB of RSS)."""

from __future__ import annotations

import numpy as np
import pytest

from tracker_svc import detector
from tracker_svc.detector import auto_tiles, detection_views

# (width, height) → tiles, as the uncapped rule ceil(aspect) + 1 gives them: these stay as they were.
COMMON = {
    "4:3": ((1440, 1080), 3),
    "16:9": ((1920, 1080), 3),
    "9:16 phone": ((1080, 1920), 3),
    "2.39:1 scope": ((2048, 858), 4),
    "21:9": ((2560, 1080), 4),
    "32:9 panorama": ((5120, 1440), 5),
    "4:1": ((3840, 960), 5),
}


def _spans_long_side(width: int, height: int, tiles: int) -> None:
    """The tiles (after the whole-frame view) start at one end, end at the other, and overlap."""
    views = detection_views(width, height, tiles)
    axis, long_side = (0, width) if width >= height else (1, height)
    side, centers = views.size[1:], views.center[1:, axis]
    assert centers[0] - side[0] / 2 == pytest.approx(0) and centers[-1] + side[-1] / 2 == pytest.approx(long_side)
    assert np.all(np.diff(centers) < side[:-1])  # neighbours overlap: no strip is left unsearched


@pytest.mark.parametrize("name", list(COMMON))
def test_common_formats_keep_their_tiles_of_the_short_side(name: str) -> None:
    (width, height), tiles = COMMON[name]
    assert auto_tiles(width, height) == tiles
    views = detection_views(width, height, tiles)
    assert len(views) == 1 + tiles
    np.testing.assert_allclose(views.size, [max(width, height)] + [min(width, height)] * tiles)
    _spans_long_side(width, height, tiles)


@pytest.mark.parametrize(("width", "height"), [(16000, 16), (16, 16000), (129600, 64), (3840, 900)])
def test_extreme_aspect_ratios_are_capped_and_still_covered(width: int, height: int) -> None:
    assert auto_tiles(width, height) == 5  # what 32:9 gets: the cost of a detector run stays that of a panorama
    for asked in (5, 1001):  # an explicit tile count is capped too
        assert len(detection_views(width, height, asked)) == 1 + detector.MAX_TILES == 6
    _spans_long_side(width, height, 5)
