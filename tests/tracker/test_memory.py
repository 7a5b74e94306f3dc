"""Peak memory does not grow with video length: frames are decoded and tracked in fixed batches."""

from __future__ import annotations

from pathlib import Path

import pytest

from tracker_svc.diagnostics import peak_rss_of_tracking, repeat_video
from tracker_svc.model_setup import ModelPaths

RSS_GROWTH_LIMIT = 1.2  # peak RSS of the 10× clip over the 1× clip


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_peak_rss_is_bounded(models: ModelPaths, runner_path: Path, tmp_path: Path) -> None:
    long_clip = tmp_path / "runner_x10.mp4"
    assert repeat_video(runner_path, long_clip, 10) == 1800
    short = peak_rss_of_tracking(runner_path)
    long = peak_rss_of_tracking(long_clip)
    print(f"peak RSS: 1x {short['peak_rss_mib']:.0f} MiB, 10x {long['peak_rss_mib']:.0f} MiB")
    assert short["frames"] == 180 and long["frames"] == 1800
    assert long["peak_rss_mib"] <= RSS_GROWTH_LIMIT * short["peak_rss_mib"]
