"""Service configuration: dataclass defaults, overridden by environment variables, then flags.

Each service declares a frozen dataclass deriving from `ServiceConfig`, one `setting()` per
option with its default and a help text. `load_config` reads `MOCAP_<SERVICE>_<NAME>` (or the
setting's explicit `env=`) and then `--name` flags; `describe_config` lists every option with its
flag, variable and default (the README's configuration table is made from it:
`python -m mocap_common.config`).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from mocap_common.services import SERVICES

T = TypeVar("T", bound="ServiceConfig")

# Where the service packages live (a checkout or site-packages): defaults that point at files
# shipped inside a package are documented relative to it.
_SOURCE_ROOT = Path(__file__).resolve().parent.parent


def setting(default: Any, help: str, *, env: str | None = None) -> Any:
    """Declares one option: its default, a help text, optionally a shared environment variable."""
    if isinstance(default, (list, dict, set)):
        raise TypeError("use a tuple for sequence defaults: configs are immutable")
    return field(default=default, metadata={"help": help, "env": env})


@dataclass(frozen=True)
class ServiceConfig:
    """Options every service has."""

    service_name: ClassVar[str] = "service"  # "gateway", "tracker", ... (sets the env prefix)

    host: str = setting("127.0.0.1", "Address the gRPC server listens on (0.0.0.0 in containers).")
    port: int = setting(0, "gRPC port (0 = pick a free port; each service sets its own default).")
    metrics_port: int = setting(-1, "Prometheus /metrics HTTP port (-1 = gRPC port + 1000, 0 = off).")
    log_level: str = setting("info", "Log level: debug, info, warning, error.")
    log_format: str = setting("json", "Log format: json (one object per line) or console.")
    grace_seconds: float = setting(10.0, "On SIGTERM, how long in-flight calls may finish before they are cancelled.")

    def __post_init__(self) -> None:
        # Every path is made absolute once, here, against the working directory the service was
        # started from: whatever later changes directory (a Blender child started with another
        # cwd, a test runner, a daemon) receives the same file.
        for name in _path_fields(type(self)):
            value = getattr(self, name)
            object.__setattr__(self, name, absolute_path(value) if value not in (None, "") else None)

    @classmethod
    def env_prefix(cls) -> str:
        return f"MOCAP_{cls.service_name.upper()}_"

    def resolved_metrics_port(self, bound_port: int) -> int:
        if self.metrics_port >= 0:
            return self.metrics_port
        return bound_port + 1000 if bound_port else 0


def absolute_path(path: Path | str) -> Path:
    """`path` with `~` expanded, made absolute against the working directory (symlinks kept)."""
    return Path(os.path.abspath(Path(path).expanduser()))


@functools.cache
def _path_fields(cls: type[ServiceConfig]) -> tuple[str, ...]:
    """Names of the settings of `cls` typed `Path` or `Path | None`."""
    hints = typing.get_type_hints(cls)
    return tuple(f.name for f in dataclasses.fields(cls) if _is_path_type(hints[f.name]))


def _is_path_type(kind: Any) -> bool:
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        return Path in typing.get_args(kind)
    return kind is Path


@dataclass(frozen=True)
class OptionDoc:
    name: str
    flag: str
    env: str
    default: str
    help: str


def describe_config(cls: type[ServiceConfig]) -> list[OptionDoc]:
    """Every option of `cls` with its flag, environment variable and default."""
    docs = []
    for f in dataclasses.fields(cls):
        docs.append(
            OptionDoc(
                name=f.name,
                flag=_flag(f.name),
                env=_env_name(cls, f),
                default=_format_default(f.default),
                help=f.metadata.get("help", ""),
            )
        )
    return docs


def load_config(cls: type[T], argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> T:
    """Builds `cls` from defaults, then the environment, then command-line flags."""
    env = os.environ if env is None else env
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        name = _env_name(cls, f)
        if name in env:
            values[f.name] = _parse(hints[f.name], env[name], f"${name}")
    parser = argparse.ArgumentParser(prog=f"mocap-{cls.service_name}", description=cls.__doc__)
    for f in dataclasses.fields(cls):
        text = f"{f.metadata.get('help', '')} [env {_env_name(cls, f)}, default {_format_default(f.default)}]"
        # argparse formats help with %: a literal one ("±25 % jitter") must be doubled.
        parser.add_argument(_flag(f.name), dest=f.name, default=None, help=text.replace("%", "%%"))
    parsed = parser.parse_args(list(argv) if argv is not None else [])
    for f in dataclasses.fields(cls):
        raw = getattr(parsed, f.name)
        if raw is not None:
            values[f.name] = _parse(hints[f.name], raw, _flag(f.name))
    return cls(**values)


def _env_name(cls: type[ServiceConfig], f: dataclasses.Field[Any]) -> str:
    return f.metadata.get("env") or cls.env_prefix() + f.name.upper()


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _format_default(value: Any) -> str:
    if isinstance(value, Path) and value.is_relative_to(_SOURCE_ROOT):
        return f"{value.relative_to(_SOURCE_ROOT)} (shipped with the package)"  # not this machine's path
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value) or "(empty)"
    if isinstance(value, bool):
        return "true" if value else "false"
    if value == "" or value is None:
        return "(empty)"
    return str(value)


def _parse(kind: Any, raw: str, where: str) -> Any:
    try:
        return _convert(kind, raw)
    except ValueError as exc:
        raise SystemExit(f"invalid value {raw!r} for {where}: {exc}") from None


def _convert(kind: Any, raw: str) -> Any:
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(kind) if a is not type(None)]
        return None if raw == "" else _convert(inner[0], raw)
    if origin is tuple:
        item = typing.get_args(kind)[0]
        return tuple(_convert(item, part.strip()) for part in raw.split(",") if part.strip())
    if kind is bool:
        lowered = raw.strip().lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise ValueError("expected true or false")
    if kind is Path:
        return Path(raw).expanduser()
    return kind(raw)


def configuration_reference() -> str:
    """docs/configuration.md: every option of every service (`mocap_common.services`, in port
    order: the public gateway first), generated from the config classes."""
    lines = [
        "# Configuration reference",
        "",
        "Generated by `python -m mocap_common.config > docs/configuration.md` from the services' config",
        "classes (a test keeps it current). Precedence: default < environment variable < flag.",
        "A relative path (the defaults under `data/` included) is made absolute once, at startup, against",
        "the working directory the service was started from; `~` is expanded.",
    ]
    for spec in sorted(SERVICES, key=lambda spec: spec.port):
        cls = spec.load_config_class()
        lines += ["", f"## {cls.service_name} (`python -m {spec.module}`)", "",
                  "| flag | environment | default | meaning |", "|---|---|---|---|"]
        for doc in describe_config(cls):
            lines.append(f"| `{doc.flag}` | `{doc.env}` | `{doc.default}` | {doc.help} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(configuration_reference(), end="")
