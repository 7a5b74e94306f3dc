"""`python -m gateway [--flags]`: the public job API (see gateway/config.py for every option)."""

from __future__ import annotations

import sys

from gateway.app import build, new_host
from gateway.config import GatewayConfig
from mocap_common.config import load_config
from mocap_common.logs import configure_logging
from mocap_common.server import run_main


async def main() -> None:
    config = load_config(GatewayConfig, sys.argv[1:])
    configure_logging(config.service_name, config.log_level, config.log_format)
    async with new_host(config) as host:
        await build(config, host)
        await host.serve_until_stopped()


if __name__ == "__main__":
    run_main(main)
