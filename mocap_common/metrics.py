"""Prometheus metrics shared by every service, with the names operators know from
go-grpc-prometheus (`grpc_server_handled_total`, `grpc_server_handling_seconds`, ...).

Service-specific metrics are declared in the service's own modules, next to the state change
they count, using the same default registry.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, start_http_server

RPC_STARTED = Counter(
    "grpc_server_started_total",
    "RPCs started on the server.",
    ["grpc_service", "grpc_method", "grpc_type"],
)
RPC_HANDLED = Counter(
    "grpc_server_handled_total",
    "RPCs completed on the server, by status code.",
    ["grpc_service", "grpc_method", "grpc_type", "grpc_code"],
)
RPC_SECONDS = Histogram(
    "grpc_server_handling_seconds",
    "Time from the start of an RPC to its end, seconds.",
    ["grpc_service", "grpc_method", "grpc_type"],
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800),
)
RPC_IN_FLIGHT = Gauge(
    "grpc_server_in_flight",
    "RPCs currently being handled.",
    ["grpc_service", "grpc_method"],
)
MSG_RECEIVED = Counter(
    "grpc_server_msg_received_total",
    "Stream messages received from clients.",
    ["grpc_service", "grpc_method", "grpc_type"],
)
MSG_SENT = Counter(
    "grpc_server_msg_sent_total",
    "Stream messages sent to clients.",
    ["grpc_service", "grpc_method", "grpc_type"],
)


def serve_metrics(port: int, host: str = "0.0.0.0") -> object | None:
    """Starts the /metrics HTTP endpoint; returns the server (or None when port is 0)."""
    if port <= 0:
        return None
    server, _thread = start_http_server(port, addr=host)
    return server
