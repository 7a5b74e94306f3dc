"""Each service starts and reports health SERVING with only its own extra installed, as in its
container (compose.yaml builds one image per service with `pip install ".[<extra>]"`).

The test venv has every extra, so each service runs as a real child process under an import
blocker: a `python -c` bootstrap puts a finder at the front of `sys.meta_path` that raises
ModuleNotFoundError for every top-level module the service's install would not have, then runs
`python -m <service>` through runpy. The blocked set comes from pyproject.toml and the installed
metadata, so it follows the extras when they change: the modules of every distribution that the
other extras (test and build included) pull in, transitively, minus those of the base
dependencies and the service's own extra.
"""

from __future__ import annotations

import ast
import functools
import importlib.metadata as metadata
import os
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterable
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from gateway.cli import TRACKER_IMPORTS
from tests.support import REPO, ServiceProcess, free_port, wait_serving

# Package → its extra in pyproject.toml.
SERVICES = {"gateway": "gateway", "tracker_svc": "tracker", "smoother_svc": "smoother",
            "exporter_svc": "exporter", "resource_svc": "resource"}
OWN_PACKAGES = frozenset({"mocap", "mocap_common", "bench", "tests", *SERVICES})
PROJECT = canonicalize_name("mocap-mesh")

# Runs in the child: argv = [-c, BLOCKED (comma-separated), MODULE, *ARGS].
BOOTSTRAP = r'''
import runpy
import sys


class InstallBlocker:
    """Refuses the top-level modules this service's install would not have."""

    def __init__(self, names):
        self.names = names

    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in self.names:
            raise ModuleNotFoundError(f"No module named {name!r} (blocked: not in this service's extra)", name=name)
        return None


blocked = frozenset(filter(None, sys.argv[1].split(",")))
early = sorted(blocked & {name.partition(".")[0] for name in sys.modules})
if early:  # imported before the blocker could refuse them (a .pth file?): the test would be blind
    sys.exit(f"blocked modules already imported at start: {early}")
sys.meta_path.insert(0, InstallBlocker(blocked))
module = sys.argv[2]
sys.argv = [module, *sys.argv[3:]]
runpy.run_module(module, run_name="__main__", alter_sys=True)
'''


# --- which modules an install has -----------------------------------------------------------


@functools.cache
def _pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


@functools.cache
def _modules_by_distribution() -> dict[str, frozenset[str]]:
    """Installed distribution → the top-level modules it provides."""
    found: dict[str, set[str]] = {}
    for module, dists in metadata.packages_distributions().items():
        for dist in dists:
            found.setdefault(canonicalize_name(dist), set()).add(module)
    return {dist: frozenset(modules) for dist, modules in found.items()}


def _closure(requirements: Iterable[str]) -> set[str]:
    """The distributions `requirements` install, with their own dependencies (markers evaluated
    for this interpreter; the project's self-references in `all` skipped)."""
    seen: set[str] = set()
    todo = [Requirement(text) for text in requirements]
    while todo:
        requirement = todo.pop()
        name = canonicalize_name(requirement.name)
        if name in seen or name == PROJECT:
            continue
        seen.add(name)
        for text in metadata.requires(name) or []:  # PackageNotFoundError: the venv lacks a pin
            dependency = Requirement(text)
            if dependency.marker is None or dependency.marker.evaluate({"extra": ""}):
                todo.append(dependency)
    return seen


def _modules(dists: Iterable[str]) -> set[str]:
    by_dist = _modules_by_distribution()
    return {module for dist in dists for module in by_dist.get(dist, ())}


@functools.cache
def _started_with_interpreter() -> frozenset[str]:
    """Top-level modules a bare interpreter has already imported (site, .pth files): no finder can
    refuse them, and no service code chose them."""
    out = subprocess.run([sys.executable, "-c", "import sys; print(' '.join(sys.modules))"],
                         capture_output=True, text=True, check=True).stdout
    return frozenset(name.partition(".")[0] for name in out.split())


def allowed_distributions(extra: str) -> set[str]:
    return _closure([*_pyproject()["dependencies"], *_pyproject()["optional-dependencies"][extra]])


@functools.cache
def blocked_modules(extra: str) -> frozenset[str]:
    """Top-level modules that `pip install ".[extra]"` would not install."""
    extras = _pyproject()["optional-dependencies"]
    everything = _closure(r for name, reqs in extras.items() if name != "all" for r in reqs)
    allowed = allowed_distributions(extra)
    blocked = _modules(everything - allowed) - _modules(allowed)
    return frozenset(m for m in blocked if m.isidentifier() and m not in sys.stdlib_module_names
                     and m not in OWN_PACKAGES and m not in _started_with_interpreter())


def launcher(extra: str) -> list[str]:
    """The command that runs `MODULE ARGS...` as if only `extra` were installed."""
    return [sys.executable, "-c", BOOTSTRAP, ",".join(sorted(blocked_modules(extra)))]


# --- the services ---------------------------------------------------------------------------


def _service_args(module: str, tmp: Path) -> list[str]:
    """Fresh data directories; every peer address points at a port nobody listens on."""
    nobody = f"127.0.0.1:{free_port()}"
    return {
        "gateway": ["--data-dir", str(tmp / "gateway"), "--min-free-bytes", "0", "--tracker-addr", nobody,
                    "--smoother-addr", nobody, "--exporter-addr", nobody],
        "tracker_svc": ["--spool-dir", str(tmp / "spool"), "--resource-addr", nobody, "--torch-threads", "1"],
        "smoother_svc": ["--checkpoint-dir", str(tmp / "checkpoints"), "--resource-addr", nobody],
        "exporter_svc": ["--work-dir", str(tmp / "work")],
        "resource_svc": ["--db-path", str(tmp / "leases.sqlite3"), "--inventory", "cpu"],
    }[module]


def _wait_serving_or_exit(service: ServiceProcess, timeout_s: float) -> None:
    """Waits for SERVING, failing at once (with the log) if the process exits first."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert service.proc is not None
        if service.proc.poll() is not None:
            pytest.fail(f"{service.module} exited with {service.proc.returncode} before SERVING:\n"
                        f"{service.log_text()[-4000:]}")
        try:
            wait_serving(service.address, timeout_s=1.0)
            return
        except TimeoutError:
            continue
    service.kill()
    pytest.fail(f"{service.module} not SERVING after {timeout_s} s:\n{service.log_text()[-4000:]}")


@pytest.mark.parametrize("module", list(SERVICES))
def test_service_serves_with_only_its_own_extra(module: str, tmp_path: Path) -> None:
    extra = SERVICES[module]
    service = ServiceProcess(module, _service_args(module, tmp_path), log_path=tmp_path / f"{module}.log",
                             launcher=launcher(extra))
    service.start(wait=False)
    try:
        _wait_serving_or_exit(service, timeout_s=120.0)
    finally:
        code = service.stop()
    assert code == 0, f"{module} did not stop cleanly on SIGTERM ({code}):\n{service.log_text()[-4000:]}"
    assert "blocked: not in this service's extra" not in service.log_text()


# A spot check of the derived sets: each extra keeps its own heavy modules, loses the others'.
OWN_HEAVY = {"gateway": {"av", "rich"}, "tracker": {"torch", "av", "tflite", "flatbuffers", "scipy"},
             "smoother": {"torch", "scipy"}, "exporter": {"bpy", "av", "scipy"},
             "resource": {"pynvml", "psutil", "rich"}}
TEST_AND_BUILD = {"pytest", "hypothesis", "ai_edge_litert", "bvh", "bvhtoolbox", "ml_dtypes", "grpc_tools"}


@pytest.mark.parametrize("extra", sorted(OWN_HEAVY))
def test_the_blocker_refuses_what_only_other_extras_bring(extra: str) -> None:
    blocked = blocked_modules(extra)
    others = set().union(*OWN_HEAVY.values()) - OWN_HEAVY[extra]
    assert not OWN_HEAVY[extra] & blocked
    assert others | TEST_AND_BUILD <= blocked
    # ... and refused for real in the child (else the test above would be blind).
    probe = sorted(others)[0]
    result = subprocess.run([*launcher(extra), "timeit", "-n", "1", "-r", "1", f"import {probe}"],
                            capture_output=True, text=True, cwd=REPO, timeout=60)
    assert result.returncode != 0 and f"No module named '{probe}' (blocked" in result.stderr, result.stderr


def _imported_packages(path: Path) -> set[str]:
    """Top-level names a module imports anywhere (also inside functions: lazy imports count)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name.partition(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.partition(".")[0])
    return found


@pytest.mark.parametrize("package", list(SERVICES))
def test_services_never_import_each_other(package: str) -> None:
    """Also the code paths a start does not reach (a command, a lazy import): what two services
    need lives once in mocap_common."""
    others = set(SERVICES) - {package}
    offending = {str(path.relative_to(REPO)): sorted(_imported_packages(path) & others)
                 for path in sorted((REPO / package).rglob("*.py"))}
    assert {path: names for path, names in offending.items() if names} == {}


# --- the commands: `mocap` (gateway extra) and `lease` (resource extra) -----------------------


@pytest.mark.parametrize(("extra", "module", "commands"), [
    ("gateway", "gateway.cli", ("submit", "watch", "download", "track")),  # `mocap`
    ("resource", "resource_svc.cli", ("run", "devices", "list", "watch")),  # `lease`
])
def test_the_commands_work_with_only_their_services_extra(extra: str, module: str, commands: tuple[str, ...]) -> None:
    result = subprocess.run([*launcher(extra), module, "--help"], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 0, result.stderr
    for command in commands:
        assert command in result.stdout


def test_mocap_track_without_the_tracker_extra_says_what_to_install(tmp_path: Path) -> None:
    video = tmp_path / "clip.mp4"
    video.write_bytes(b"not looked at: the install is checked first")
    result = subprocess.run([*launcher("gateway"), "gateway.cli", "track", str(video), "--out", str(tmp_path / "t.npz")],
                            capture_output=True, text=True, cwd=REPO, timeout=120)
    message = " ".join(result.stderr.split())  # rich wraps long lines
    assert result.returncode == 2, result.stderr
    assert 'pip install ".[tracker]"' in message and "torch" in message
    assert "Traceback" not in result.stderr


def test_mocap_track_runs_the_tracker_as_a_child_and_passes_its_status_through(tmp_path: Path) -> None:
    """With the tracker's extra too, `mocap track` runs `python -m tracker_svc track`: here with an
    empty model directory, so the tracker's own error and exit status (1) come back quickly."""
    video = tmp_path / "clip.mp4"
    video.write_bytes(b"\0" * 1024)
    env = {**os.environ, "MOCAP_MODEL_DIR": str(tmp_path / "no-models")}
    result = subprocess.run([sys.executable, "-m", "gateway.cli", "track", str(video), "--out", str(tmp_path / "t.npz")],
                            capture_output=True, text=True, cwd=REPO, env=env, timeout=120)
    assert result.returncode == 1, result.stderr
    assert "make setup" in result.stderr


def test_mocap_track_checks_for_exactly_the_tracker_extra() -> None:
    """gateway.cli.TRACKER_IMPORTS names one module of each distribution in the tracker extra."""
    by_dist = _modules_by_distribution()
    tracker_dists = {canonicalize_name(Requirement(r).name) for r in _pyproject()["optional-dependencies"]["tracker"]}
    assert {dist for dist in tracker_dists if by_dist[dist] & set(TRACKER_IMPORTS)} == tracker_dists
    assert set(TRACKER_IMPORTS) <= _modules(tracker_dists)
