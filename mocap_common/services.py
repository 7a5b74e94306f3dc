"""The five services of the mesh, one row each: what the launcher starts and the configuration
reference documents. Adding a service is one row here (plus its package).

Rows are in start order: each service starts after those it calls (the broker first, the public
gateway last), and `make run --base-port B` gives the row at index i the port B + i. Only names
are stored, never imports: mocap_common imports no service (each container installs one).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mocap_common.config import ServiceConfig


@dataclass(frozen=True)
class ServiceSpec:
    name: str  # "resource", ...: the config's service_name, log file and messages
    module: str  # `python -m <module>` starts it
    port: int  # default gRPC port (its config class's default)
    config_class: str  # "package.module:ClassName" of its ServiceConfig
    env_addr: str  # the variable other services read its address from

    def load_config_class(self) -> type[ServiceConfig]:
        module, _, name = self.config_class.partition(":")
        return getattr(importlib.import_module(module), name)


SERVICES = (
    ServiceSpec("resource", "resource_svc", 50055, "resource_svc.config:ResourceConfig", "MOCAP_RESOURCE_ADDR"),
    ServiceSpec("tracker", "tracker_svc", 50052, "tracker_svc.config:TrackerServiceConfig", "MOCAP_TRACKER_ADDR"),
    ServiceSpec("smoother", "smoother_svc", 50053, "smoother_svc.config:SmootherConfig", "MOCAP_SMOOTHER_ADDR"),
    ServiceSpec("exporter", "exporter_svc", 50054, "exporter_svc.config:ExporterConfig", "MOCAP_EXPORTER_ADDR"),
    ServiceSpec("gateway", "gateway", 50051, "gateway.config:GatewayConfig", "MOCAP_GATEWAY_ADDR"),
)
