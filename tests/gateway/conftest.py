from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import pytest

from gateway.app import Gateway
from gateway.config import GatewayConfig
from tests.gateway.fakes import FakeStages
from tests.gateway.helpers import Client, use_database
from tests.gateway.helpers import database_url as current_database_url
from tests.pgserver import postgres_server, postgres_url  # noqa: F401 - fixtures
from tests.support import RUNNER_MP4


@pytest.fixture(scope="session")
def runner_bytes() -> bytes:
    return RUNNER_MP4.read_bytes()


@pytest.fixture
def stages() -> Iterator[FakeStages]:
    fakes = FakeStages()
    yield fakes
    fakes.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request) -> Iterator[str]:
    """Every gateway test that has a data dir runs on both job stores: SQLite in the data dir
    (the embedded default) and a fresh database of a real PostgreSQL server (tests/pgserver.py)."""
    url = "" if request.param == "sqlite" else request.getfixturevalue("postgres_url")
    use_database(url)
    yield url
    use_database("")


@pytest.fixture
def data_dir(tmp_path, database_url):
    return tmp_path / "data"


def gateway_config(data_dir, stages: FakeStages, **overrides: Any) -> GatewayConfig:
    values: dict[str, Any] = {
        "host": "127.0.0.1", "port": 0, "metrics_port": 0, "data_dir": data_dir, "min_free_bytes": 0,
        "database_url": current_database_url(),
        "grace_seconds": 1.0, "stage_retry_backoff_s": 0.05, **stages.config_overrides(),
    }
    values.update(overrides)
    return GatewayConfig(**values)


@pytest.fixture
async def start_gateway(data_dir, stages) -> AsyncIterator[Callable[..., Awaitable[Gateway]]]:
    """Starts in-process gateways (real gRPC server, real SQLite, real files) on ephemeral ports."""
    started: list[Gateway] = []

    async def start(**overrides: Any) -> Gateway:
        gateway = await Gateway.start(gateway_config(data_dir, stages, **overrides))
        started.append(gateway)
        return gateway

    yield start
    for gateway in started:
        await gateway.stop(0)


@pytest.fixture
async def gateway(start_gateway) -> Gateway:
    return await start_gateway()


@pytest.fixture
async def client(gateway) -> AsyncIterator[Client]:
    async with Client(f"127.0.0.1:{gateway.port}") as c:
        yield c
