"""Model cache: verification, the "run make setup" failure, atomic extraction from the wheel."""

from __future__ import annotations

import shutil
import zipfile
from pathlib import Path

import pytest

from tracker_svc import model_setup
from tracker_svc.errors import ModelSetupError, ModelsMissingError
from tracker_svc.model_setup import DETECTOR, LANDMARK, ModelPaths, ensure_models, model_paths


def _fake_wheel(tmp_path: Path, models: ModelPaths, corrupt: bool = False) -> Path:
    wheel = tmp_path / "mediapipe-0.10.14-cp311-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("mediapipe/__init__.py", "")
        archive.write(models.detector, DETECTOR.member)
        data = models.landmark.read_bytes()
        archive.writestr(LANDMARK.member, data[:-1] + b"x" if corrupt else data)
    return wheel


def test_missing_models_say_run_make_setup(tmp_path: Path) -> None:
    with pytest.raises(ModelsMissingError, match="make setup"):
        model_paths(tmp_path)


def test_corrupt_model_is_detected(tmp_path: Path, models: ModelPaths) -> None:
    shutil.copy(models.detector, tmp_path / DETECTOR.filename)
    (tmp_path / LANDMARK.filename).write_bytes(b"not a model")
    with pytest.raises(ModelsMissingError, match="corrupt.*make setup"):
        model_paths(tmp_path)


def test_env_var_selects_the_cache(tmp_path: Path, models: ModelPaths, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(model_setup.ENV_MODEL_DIR, str(models.detector.parent))
    assert model_paths().detector == models.detector
    monkeypatch.setenv(model_setup.ENV_MODEL_DIR, str(tmp_path))
    with pytest.raises(ModelsMissingError):
        model_paths()


def test_setup_extracts_and_verifies(tmp_path: Path, models: ModelPaths, monkeypatch: pytest.MonkeyPatch) -> None:
    wheel = _fake_wheel(tmp_path, models)
    downloads = []
    monkeypatch.setattr(model_setup, "_download_wheel", lambda dest: downloads.append(dest) or wheel)
    cache = tmp_path / "cache"
    paths = ensure_models(cache)
    assert paths.detector.read_bytes() == models.detector.read_bytes()
    assert paths.landmark.read_bytes() == models.landmark.read_bytes()
    assert sorted(p.name for p in cache.iterdir()) == sorted([DETECTOR.filename, LANDMARK.filename])  # no temp files
    ensure_models(cache)
    assert len(downloads) == 1, "a verified cache is not downloaded again"


def test_setup_refuses_a_wrong_checksum(tmp_path: Path, models: ModelPaths, monkeypatch: pytest.MonkeyPatch) -> None:
    wheel = _fake_wheel(tmp_path, models, corrupt=True)
    monkeypatch.setattr(model_setup, "_download_wheel", lambda dest: wheel)
    cache = tmp_path / "cache"
    with pytest.raises(ModelSetupError, match="sha256"):
        ensure_models(cache)
    assert not (cache / LANDMARK.filename).exists()
    assert not [p for p in cache.iterdir() if p.name.endswith(".tmp")]


def test_main_reports_failure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    def fail(dest: Path) -> Path:
        raise ModelSetupError("pip download mediapipe==0.10.14 failed: no network")

    monkeypatch.setattr(model_setup, "_download_wheel", fail)
    assert model_setup.main(["--cache", str(tmp_path)]) == 1
    assert "no network" in capsys.readouterr().err
