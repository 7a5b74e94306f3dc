"""A very dark clip (the runner at RGB × 0.08) is still tracked: the pipeline brightens frames
too dark for BlazePose before the models see them. Without that the detector finds nobody."""

from __future__ import annotations

from pathlib import Path

from tests.video_corpus import clip, make_clip, require_tools
from tracker_svc.model_setup import ModelPaths
from tracker_svc.pipeline import PoseTracker, TrackerConfig


def test_very_dark_clip_is_tracked(models: ModelPaths, tmp_path: Path) -> None:
    dark = clip("very_dark")
    path = make_clip(dark, require_tools(dark), tmp_path)
    tracked = PoseTracker(models, device="cpu").track_to_set(path)
    assert [len(t) for t in tracked.tracks] == [45]  # the runner, in every frame
    as_is = PoseTracker(models, device="cpu", config=TrackerConfig(brighten_dark=False)).track_to_set(path)
    assert as_is.tracks == []  # what the models make of the raw picture: why the gain exists
