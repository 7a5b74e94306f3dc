"""Versioned checkpoints of the learned smoother: `v1.pt`, `v2.pt`, ... in one directory.

A checkpoint appears whole or not at all: it is written to a temp file in the same directory,
fsynced, then hard-linked to its version's name — `link` fails if the name exists, so two writers
(threads or processes) never take the same version; the loser takes the next number. Versions
only increase; the newest is served. Each file holds `{"format", "meta", "state_dict"}` and is
read back with `torch.load(weights_only=True)` (no pickled code runs).
"""

from __future__ import annotations

import io
import os
import re
import threading
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch

from mocap_common.files import AtomicFile
from smoother_svc.smoothnet import INPUT_SCALE, LearnedSmoother, SmoothNet
from smoother_svc.training import TrainedModel

FORMAT = 1
_NAME = re.compile(r"^v([1-9][0-9]{0,8})\.pt$")


@dataclass(frozen=True)
class CheckpointInfo:
    """What ListCheckpoints reports about one checkpoint."""

    version: str  # "v3"
    number: int
    create_time: datetime
    window: int
    epochs: int
    val_accel_error_mm: float
    val_mpjpe_mm: float
    val_accel_error_input_mm: float
    val_mpjpe_input_mm: float
    training_clips: tuple[str, ...]
    validation_clip: str
    seed: int
    noise_source: str
    steps: int = 0
    input_scale: float = INPUT_SCALE


class CheckpointStore:
    """The checkpoint directory. A missing or unreadable directory simply holds no checkpoints."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._lock = threading.Lock()
        self._infos: dict[str, tuple[float, CheckpointInfo]] = {}  # file name → (mtime, info)

    def _numbers(self) -> list[int]:
        try:
            names = os.listdir(self.directory)
        except OSError:
            return []
        return sorted((int(m.group(1)) for m in map(_NAME.match, names) if m), reverse=True)

    def list(self) -> list[CheckpointInfo]:
        """Every readable checkpoint, newest first."""
        infos = []
        for number in self._numbers():
            info = self._info(number)
            if info is not None:
                infos.append(info)
        return infos

    def newest(self) -> CheckpointInfo | None:
        for number in self._numbers():
            info = self._info(number)
            if info is not None:
                return info
        return None

    def path(self, number: int) -> Path:
        return self.directory / f"v{number}.pt"

    def _info(self, number: int) -> CheckpointInfo | None:
        path = self.path(number)
        try:
            mtime = path.stat().st_mtime
            cached = self._infos.get(path.name)
            if cached and cached[0] == mtime:
                return cached[1]
            data = torch.load(path, map_location="cpu", weights_only=True)
            info = _info_from_meta(number, data["meta"])
        except Exception:  # noqa: BLE001 - unreadable, truncated or foreign: not a checkpoint we serve
            return None
        self._infos[path.name] = (mtime, info)
        return info

    def load(self, info: CheckpointInfo) -> LearnedSmoother:
        data = torch.load(self.path(info.number), map_location="cpu", weights_only=True)
        model = SmoothNet(window=info.window)
        model.load_state_dict(data["state_dict"])
        model.eval()
        return LearnedSmoother(model=model, version=info.version, input_scale=info.input_scale)

    def save(self, trained: TrainedModel) -> CheckpointInfo:
        """Publishes `trained` as the next version. Raises OSError when it cannot be written."""
        meta = {
            "create_time": datetime.now(timezone.utc).isoformat(),
            "window": trained.window,
            "epochs": trained.epochs_completed,
            "steps": trained.steps,
            "val_accel_error_mm": trained.val_accel_error_mm,
            "val_mpjpe_mm": trained.val_mpjpe_mm,
            "val_accel_error_input_mm": trained.val_accel_error_input_mm,
            "val_mpjpe_input_mm": trained.val_mpjpe_input_mm,
            "training_clips": list(trained.training_clips),
            "validation_clip": trained.validation_clip,
            "seed": trained.config.seed,
            "noise_source": trained.noise_source,
            "input_scale": INPUT_SCALE,
            "config": {k: v for k, v in asdict(trained.config).items()},
            "stopped_early": trained.stopped_early,
        }
        buffer = io.BytesIO()
        torch.save({"format": FORMAT, "meta": meta, "state_dict": trained.state_dict}, buffer)
        with self._lock:
            number = self._publish(buffer.getvalue())
        info = self._info(number)
        assert info is not None
        return info

    def _publish(self, data: bytes) -> int:
        file = AtomicFile(self.directory / "checkpoint")  # temp name .checkpoint.*.tmp
        try:
            file.handle.write(data)
        except BaseException:
            file.discard()
            raise

        def free_names() -> Iterator[Path]:
            # From the next number after the newest at the time of linking, upwards.
            number = (self._numbers() or [0])[0] + 1
            while True:
                yield self.path(number)
                number += 1

        published = file.commit_new(free_names())
        return int(_NAME.match(published.name).group(1))  # type: ignore[union-attr]


def _info_from_meta(number: int, meta: dict) -> CheckpointInfo:
    return CheckpointInfo(
        version=f"v{number}",
        number=number,
        create_time=datetime.fromisoformat(meta["create_time"]),
        window=int(meta["window"]),
        epochs=int(meta["epochs"]),
        val_accel_error_mm=float(meta["val_accel_error_mm"]),
        val_mpjpe_mm=float(meta["val_mpjpe_mm"]),
        val_accel_error_input_mm=float(meta["val_accel_error_input_mm"]),
        val_mpjpe_input_mm=float(meta["val_mpjpe_input_mm"]),
        training_clips=tuple(meta["training_clips"]),
        validation_clip=str(meta["validation_clip"]),
        seed=int(meta["seed"]),
        noise_source=str(meta["noise_source"]),
        steps=int(meta.get("steps", 0)),
        input_scale=float(meta.get("input_scale", INPUT_SCALE)),
    )
