"""Fetch the two BlazePose .tflite files into the model cache, and find them there later.

The weights ship inside the `mediapipe==0.10.14` wheel on PyPI. Setup downloads that wheel with pip
(no dependencies: the project never imports mediapipe, whose protobuf pin conflicts with
grpcio-tools), extracts exactly the two files, checks their sha256 and writes them atomically into
the cache. Running it again when the cache already holds verified files does nothing.

    python -m tracker_svc.model_setup [--cache DIR]

The cache is `--cache`, else `$MOCAP_MODEL_DIR`, else `~/.cache/mocap-mesh/models`.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from mocap_common.files import atomic_write_bytes, sha256_file
from tracker_svc.errors import ModelSetupError, ModelsMissingError

MEDIAPIPE_REQUIREMENT = "mediapipe==0.10.14"
ENV_MODEL_DIR = "MOCAP_MODEL_DIR"
DEFAULT_MODEL_DIR = Path("~/.cache/mocap-mesh/models")


@dataclass(frozen=True)
class ModelFile:
    member: str  # path inside the wheel
    sha256: str

    @property
    def filename(self) -> str:
        return Path(self.member).name


DETECTOR = ModelFile(
    "mediapipe/modules/pose_detection/pose_detection.tflite",
    "9ba9dd3d42efaaba86b4ff0122b06f29c4122e756b329d89dca1e297fd8f866c",
)
LANDMARK = ModelFile(
    "mediapipe/modules/pose_landmark/pose_landmark_full.tflite",
    "e9a5c5cb17f736fafd4c2ec1da3b3d331d6edbe8a0d32395855aeb2cdfd64b9f",
)
MODEL_FILES = (DETECTOR, LANDMARK)


@dataclass(frozen=True)
class ModelPaths:
    """Verified model files in the cache."""

    detector: Path
    landmark: Path


def default_cache_dir() -> Path:
    """`$MOCAP_MODEL_DIR` when set, else `~/.cache/mocap-mesh/models`."""
    configured = os.environ.get(ENV_MODEL_DIR)
    return Path(configured).expanduser() if configured else DEFAULT_MODEL_DIR.expanduser()


def model_paths(cache_dir: Path | str | None = None) -> ModelPaths:
    """Returns the cached model files after checking their checksums.

    Raises ModelsMissingError, naming the file and the fix, when one is absent or corrupt.
    """
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    for model in MODEL_FILES:
        problem = _cache_problem(cache / model.filename, model.sha256)
        if problem:
            raise ModelsMissingError(
                f"model {model.filename} {problem} in {cache}: run `make setup` "
                f"(python -m tracker_svc.model_setup --cache {cache})"
            )
    return ModelPaths(detector=cache / DETECTOR.filename, landmark=cache / LANDMARK.filename)


def ensure_models(cache_dir: Path | str | None = None) -> ModelPaths:
    """Makes the cache hold verified model files, downloading the wheel only when needed."""
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    missing = [m for m in MODEL_FILES if _cache_problem(cache / m.filename, m.sha256)]
    if missing:
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="mocap-model-setup-") as tmp:
            wheel = _download_wheel(Path(tmp))
            for model in missing:
                _extract_verified(wheel, model, cache)
    return model_paths(cache)


def _cache_problem(path: Path, sha256: str) -> str | None:
    if not path.is_file():
        return "is missing"
    if sha256_file(path) != sha256:
        return "is corrupt (sha256 mismatch)"
    return None


def _download_wheel(dest: Path) -> Path:
    # The wheel for this interpreter and platform; only binaries, so pip never builds anything.
    command = [
        sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
        "--only-binary=:all:", "--dest", str(dest), MEDIAPIPE_REQUIREMENT,
    ]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise ModelSetupError(f"pip download {MEDIAPIPE_REQUIREMENT} failed: {result.stderr.strip()}")
    wheels = sorted(dest.glob("mediapipe-*.whl"))
    if len(wheels) != 1:
        raise ModelSetupError(f"expected one mediapipe wheel in {dest}, found {[w.name for w in wheels]}")
    return wheels[0]


def _extract_verified(wheel: Path, model: ModelFile, cache: Path) -> None:
    try:
        with zipfile.ZipFile(wheel) as archive:
            data = archive.read(model.member)
    except (KeyError, zipfile.BadZipFile) as exc:
        raise ModelSetupError(f"cannot read {model.member} from {wheel.name}: {exc}") from exc
    actual = hashlib.sha256(data).hexdigest()
    if actual != model.sha256:
        raise ModelSetupError(f"{model.member} has sha256 {actual}, expected {model.sha256}")
    # Temp file in the same directory, then rename: a reader never sees a half-written model.
    # 0644: the cache is shared by services (mkstemp alone makes 0600).
    atomic_write_bytes(cache / model.filename, data, permissions=0o644)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Download and verify the BlazePose models.")
    parser.add_argument("--cache", type=Path, default=None, help="model cache directory")
    args = parser.parse_args(argv)
    try:
        paths = ensure_models(args.cache)
    except ModelSetupError as exc:
        print(f"model setup failed: {exc}", file=sys.stderr)
        return 1
    print(f"models ready: {paths.detector} {paths.landmark}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
