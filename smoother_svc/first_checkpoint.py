"""Trains the learned smoother's first checkpoint at setup time, so the service can serve the
learned method without a manual step.

    python -m smoother_svc.first_checkpoint [--checkpoint-dir DIR] [--force]

Does nothing when a checkpoint already exists (unless --force). Deterministic: the default
training configuration with seed 1 on the CPU (about a minute on one core). It runs before the
mesh is up, so it holds no training lease; training through the running service (the Train RPC)
always does.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from smoother_svc.checkpoints import CheckpointStore
from smoother_svc.config import SmootherConfig
from smoother_svc.noise import load_noise_model
from smoother_svc.training import TrainingConfig, TrainingData, train


def main(argv: list[str] | None = None) -> int:
    defaults = SmootherConfig()
    parser = argparse.ArgumentParser(prog="python -m smoother_svc.first_checkpoint", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint-dir", type=Path, default=defaults.checkpoint_dir)
    parser.add_argument("--mocap-dir", type=Path, default=defaults.mocap_dir)
    parser.add_argument("--force", action="store_true", help="train even if a checkpoint exists")
    args = parser.parse_args(argv)
    store = CheckpointStore(args.checkpoint_dir)
    existing = store.newest()
    if existing is not None and not args.force:
        print(f"checkpoint {existing.version} already in {args.checkpoint_dir}; nothing to do", file=sys.stderr)
        return 0
    torch.set_num_threads(1)
    config = TrainingConfig(epochs=defaults.train_epochs, steps_per_epoch=defaults.train_steps_per_epoch,
                            batch_size=defaults.train_batch_size, learning_rate=defaults.train_learning_rate, seed=1)
    data = TrainingData.load(args.mocap_dir, load_noise_model())
    trained = train(config, data, on_progress=lambda p: print(
        f"epoch {p.epoch}/{p.epochs} step {p.step} loss {p.loss:.4f} val accel {p.val_accel_error_mm:.2f} mm/f² "
        f"MPJPE {p.val_mpjpe_mm:.2f} mm", file=sys.stderr))
    info = store.save(trained)
    print(f"wrote {info.version} to {args.checkpoint_dir}: val accel {info.val_accel_error_input_mm:.2f} → "
          f"{info.val_accel_error_mm:.2f} mm/f², MPJPE {info.val_mpjpe_input_mm:.2f} → {info.val_mpjpe_mm:.2f} mm",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
