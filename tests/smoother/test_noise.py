"""The tracker noise model: sampling has the stated statistics, and measuring recovers the
parameters of noise with known parameters."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from mocap_common.poses import PoseTrackSet, VideoInfo
from smoother_svc.noise import NoiseModel, ar1_noise, load_noise_model, measure_noise, sample_noise
from tests.smoother.helpers import make_track


def test_shipped_model_is_complete_and_says_where_it_came_from():
    model = load_noise_model()
    assert len(model.world_std_m) == 33 and len(model.image_std_rel) == 33 and len(model.dropout_rate) == 33
    assert all(0 < v < 1 for row in model.world_std_m for v in row)
    assert 0 <= model.ar1 < 1 and model.source
    assert NoiseModel.from_dict(__import__("json").loads(model.to_json())) == model


@pytest.mark.parametrize("rho", [0.0, 0.5, 0.9])
def test_ar1_noise_has_unit_variance_and_its_lag1_correlation(rho):
    noise = ar1_noise(np.random.default_rng(1), (200_000, 2), rho)
    assert noise.std() == pytest.approx(1.0, rel=0.02)
    lag1 = np.mean(noise[1:] * noise[:-1]) / np.mean(noise * noise)
    assert lag1 == pytest.approx(rho, abs=0.01)


def test_sampled_noise_follows_the_model():
    model = replace(load_noise_model(), outlier_rate=0.0)
    sample = sample_noise(model, 20_000, np.random.default_rng(2))
    seen = sample.visibility >= 0.5
    # σ where the landmark is seen (dropout frames are noisier by design)
    std = np.array([[sample.world[seen[:, j], j, k].std() for k in range(3)] for j in range(33)])
    np.testing.assert_allclose(std, np.asarray(model.world_std_m), rtol=0.1)
    np.testing.assert_allclose((~seen).mean(axis=0), model.dropout_rate, atol=0.03)


def _noise_only_sets(model: NoiseModel, videos: int = 2, frames: int = 900) -> list[PoseTrackSet]:
    sets = []
    for k in range(videos):
        sample = sample_noise(model, frames, np.random.default_rng(10 + k))
        track = make_track(np.arange(frames) / 30.0)  # a still pose: everything that moves is noise
        track.world += sample.world.astype(np.float32)
        track.image[:, :, 3] = sample.visibility
        sets.append(PoseTrackSet(VideoInfo(1920, 1080, 30.0, frames, frames / 30.0), [track]))
    return sets


@pytest.mark.parametrize("rho", [0.0, 0.3, 0.5])
def test_measuring_recovers_known_noise(rho):
    """Tolerances: ρ ±0.1; σ (median over landmark axes) within 20 % — the dropout frames, noisier
    by design, inflate it a little; dropout rate ±20 %; spike size ±25 %; spike rate within 2.5×
    (spikes inside noisier dropout runs are missed)."""
    truth = replace(load_noise_model(), ar1=rho, outlier_rate=0.002, outlier_sigmas=10.0)
    got = measure_noise(_noise_only_sets(truth))
    assert got.ar1 == pytest.approx(rho, abs=0.1)
    ratio = np.asarray(got.world_std_m) / np.asarray(truth.world_std_m)
    assert np.median(ratio) == pytest.approx(1.0, rel=0.2)
    assert np.mean(got.dropout_rate) == pytest.approx(np.mean(truth.dropout_rate), rel=0.2)
    assert got.outlier_sigmas == pytest.approx(10.0, rel=0.25)
    assert truth.outlier_rate / 2.5 < got.outlier_rate < truth.outlier_rate * 2.5
    assert not got.provisional


def test_measuring_needs_a_long_enough_segment():
    short = PoseTrackSet(VideoInfo(640, 480, 30.0, 30, 1.0), [make_track(np.arange(30) / 30.0)])
    with pytest.raises(ValueError):
        measure_noise([short])


def test_measure_command_reads_the_trackers_npz_output(tmp_path):
    """`python -m smoother_svc.noise measure` takes the tracker's raw tracks as .npz files (what
    `python -m tracker_svc track --out` writes), so measuring needs no tracker in this install."""
    from mocap_common.trackio import save_track_set
    from smoother_svc.noise import main

    sets = _noise_only_sets(replace(load_noise_model(), ar1=0.3))
    paths = [tmp_path / f"video{k}.npz" for k in range(len(sets))]
    for path, track_set in zip(paths, sets):
        save_track_set(path, track_set)
    out = tmp_path / "noise.json"
    assert main(["measure", *map(str, paths), "--out", str(out)]) == 0
    got = load_noise_model(out)
    assert got.world_std_m == measure_noise(sets).world_std_m
    assert "video0" in got.source and "video1" in got.source
