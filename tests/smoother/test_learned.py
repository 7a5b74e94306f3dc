"""The learned smoother: SmoothNet's architecture, sliding-window inference, training, and
versioned checkpoints."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from smoother_svc.checkpoints import CheckpointStore
from smoother_svc.errors import TrainingFailed
from smoother_svc.noise import load_noise_model
from smoother_svc.smoothnet import LearnedSmoother, SmoothNet, smooth_sequence, smooth_windows
from smoother_svc.trainer import ServedModel
from smoother_svc.training import TrainingConfig, TrainingData, TrainingStopped, train
from tests.smoother.helpers import MOCAP_DIR

TINY = TrainingConfig(epochs=2, steps_per_epoch=64, batch_size=256, seed=3)


@pytest.fixture(scope="module")
def data() -> TrainingData:
    return TrainingData.load(MOCAP_DIR, load_noise_model())


@pytest.fixture(scope="module")
def tiny_model(data):
    torch.set_num_threads(1)
    return train(TINY, data)


def test_architecture_is_smoothnets():
    """Linear(T, 512) → LeakyReLU(0.1) → 3 × [Linear(512, 256) → Dropout(0.5) → LeakyReLU(0.2) →
    Linear(256, 512) → Dropout(0.5) → LeakyReLU(0.2), + identity] → Linear(512, T)."""
    net = SmoothNet(window=32)
    encoder_linear, encoder_act = net.encoder
    assert (encoder_linear.in_features, encoder_linear.out_features) == (32, 512)
    assert isinstance(encoder_act, nn.LeakyReLU) and encoder_act.negative_slope == 0.1
    assert len(net.blocks) == 3
    for block in net.blocks:
        assert (block.linear1.in_features, block.linear1.out_features) == (512, 256)
        assert (block.linear2.in_features, block.linear2.out_features) == (256, 512)
        assert block.dropout.p == 0.5 and block.activation.negative_slope == 0.2
    assert (net.decoder.in_features, net.decoder.out_features) == (512, 32)
    expected = (32 * 512 + 512) + 3 * (512 * 256 + 256 + 256 * 512 + 512) + (512 * 32 + 32)
    assert sum(p.numel() for p in net.parameters()) == expected


def test_sliding_window_step_one_is_averaged():
    """Against a direct loop: every window start, outputs summed per sample, divided by the count."""
    torch.manual_seed(0)
    net = SmoothNet(window=8).eval()
    values = np.random.default_rng(0).standard_normal((30, 3))
    got = smooth_sequence(net, values)
    total, count = np.zeros_like(values), np.zeros(30)
    with torch.no_grad():
        for start in range(30 - 8 + 1):
            window = torch.as_tensor(values[start:start + 8].T, dtype=torch.float32)
            total[start:start + 8] += smooth_windows(net, window).numpy().T
            count[start:start + 8] += 1
    np.testing.assert_allclose(got, total / count[:, None], atol=1e-5)


def test_training_is_deterministic_and_reports_progress(data, tiny_model):
    seen = []
    again = train(TINY, data, on_progress=seen.append)
    for name, tensor in tiny_model.state_dict.items():
        assert torch.equal(tensor, again.state_dict[name]), name
    assert [p.epoch for p in seen] == [0, 1, 2] and seen[-1].step == 128
    assert np.isfinite(seen[-1].loss) and seen[-1].val_accel_error_mm > 0


def test_trained_model_cuts_validation_jitter_on_the_held_out_clip(tiny_model):
    """Even 128 steps cut the held-out clip's acceleration error by more than 80 % without making
    positions worse (the default run is 8× longer)."""
    assert tiny_model.val_accel_error_mm < 0.2 * tiny_model.val_accel_error_input_mm
    assert tiny_model.val_mpjpe_mm < tiny_model.val_mpjpe_input_mm
    assert tiny_model.validation_clip == "cmu_131_03" and "cmu_131_03" not in tiny_model.training_clips


def test_learned_constant_and_line_are_kept_approximately(tiny_model):
    """Not exact (a trained network): a still landmark moves < 2 mm, a 1 m/s straight line stays
    within 10 mm of itself, ends included (odd reflection at the edges)."""
    net = SmoothNet(window=32)
    net.load_state_dict(tiny_model.state_dict)
    learned = LearnedSmoother(net.eval(), "t")
    t = np.arange(200) / 30.0
    constant = np.tile([0.3, -0.5, 1.2], (200, 1))
    line = np.stack([0.5 + 0.3 * t, -0.2 * t, 0.7 + 1.0 * t], axis=1)
    assert np.abs(learned.apply(t, constant) - constant).max() < 0.002
    assert np.abs(learned.apply(t, line) - line).max() < 0.010


def test_stop_flag_stops_training(data):
    calls = []

    def stop() -> bool:
        calls.append(1)
        return len(calls) > 3

    with pytest.raises(TrainingStopped):
        train(TrainingConfig(epochs=1, steps_per_epoch=50, batch_size=8), data, should_stop=stop)


def test_diverging_loss_fails_cleanly(data):
    with pytest.raises(TrainingFailed, match="non-finite"):
        train(TrainingConfig(epochs=1, steps_per_epoch=20, batch_size=8, learning_rate=1e30), data)


def test_window_longer_than_the_data_fails(data):
    with pytest.raises(TrainingFailed, match="window"):
        train(TrainingConfig(window=10_000), data)


# --- checkpoints ----------------------------------------------------------------------------


def test_versions_increase_and_the_newest_is_served(tmp_path: Path, tiny_model):
    store = CheckpointStore(tmp_path / "ck")
    served = ServedModel(store)
    assert store.list() == [] and served.get() is None
    first = store.save(tiny_model)
    second = store.save(tiny_model)
    assert (first.version, second.version) == ("v1", "v2")
    assert [c.version for c in store.list()] == ["v2", "v1"]
    assert served.get().version == "v2"
    assert second.training_clips == ("cmu_131_01", "cmu_131_02") and second.seed == 3
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["v1.pt", "v2.pt"]  # no temp files left


def test_concurrent_writers_never_share_a_version(tmp_path: Path, tiny_model):
    stores = [CheckpointStore(tmp_path) for _ in range(4)]  # separate stores: as separate processes
    results: list[str] = []
    threads = [threading.Thread(target=lambda s=s: results.append(s.save(tiny_model).version)) for s in stores]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == ["v1", "v2", "v3", "v4"]


def test_unreadable_files_are_not_checkpoints(tmp_path: Path, tiny_model):
    store = CheckpointStore(tmp_path)
    store.save(tiny_model)
    (tmp_path / "v7.pt").write_bytes(b"not a checkpoint")
    (tmp_path / "notes.txt").write_text("hello")
    assert [c.version for c in store.list()] == ["v1"]
    assert store.save(tiny_model).version == "v8"  # versions never go back, even past junk


def test_missing_or_blocked_directory_holds_no_checkpoints(tmp_path: Path, tiny_model):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    store = CheckpointStore(blocker / "checkpoints")
    assert store.list() == [] and store.newest() is None
    with pytest.raises(OSError):
        store.save(tiny_model)
