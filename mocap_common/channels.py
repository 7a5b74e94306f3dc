"""Client channels between services: message limits, keepalive, request-id propagation,
deadline propagation, and client-side load balancing over a stage's replicas.

Python gRPC does not propagate deadlines by itself: a handler that calls another service passes
`timeout=downstream_timeout(context)` so the callee never works past the caller's deadline.

Targets. A service is reached through one address string; `open_channel` accepts:

- `host:port` — one server (a host name still resolves through DNS, so a name with several
  records is balanced as well).
- `dns:///name:port` — every A/AAAA record of `name` (e.g. a Kubernetes headless Service, one
  record per pod); gRPC re-resolves when a connection drops, so replicas may come and go.
- `10.0.0.1:50052,10.0.0.2:50052` — a static list of IP literals (IPv6 as `[::1]:50052`), all
  of one family; it becomes gRPC's own `ipv4:a:p,b:p` / `ipv6:[a]:p,[b]:p` target. A host name
  in such a list is refused: gRPC has no "list of names" target, so a name must come through
  `dns:///name:port`.
- any target already in gRPC's syntax (`dns:`, `ipv4:`, `ipv6:`, `unix:` …) is passed through.

Every channel balances round robin over all addresses its target resolves to (gRPC's default,
pick_first, would send every call to one replica): each call goes to the next READY replica, a
replica that dies is skipped from then on (its in-flight calls fail UNAVAILABLE, which callers
retry) and reconnected to in the background.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Sequence
from typing import Any

import grpc

from mocap_common.interceptors import REQUEST_ID_HEADER
from mocap_common.logs import current_context
from mocap_common.server import MAX_MESSAGE_BYTES

ROUND_ROBIN_SERVICE_CONFIG = json.dumps({"loadBalancingConfig": [{"round_robin": {}}]})

# Targets gRPC parses itself (its resolver schemes); passed through as they are.
GRPC_SCHEMES = ("dns:", "ipv4:", "ipv6:", "unix:", "unix-abstract:", "vsock:")

CHANNEL_OPTIONS = (
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    # Fail fast when a peer is down instead of backing off for minutes; callers own retries.
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2_000),
    ("grpc.enable_retries", 0),
    # Round robin over every replica; the mesh decides its balancing, not a DNS TXT record.
    ("grpc.service_config", ROUND_ROBIN_SERVICE_CONFIG),
    ("grpc.service_config_disable_resolution", 1),
)


def channel_target(addresses: str) -> str:
    """The gRPC target for an address setting (the forms in the module docstring).

    Raises ValueError for a comma list that is not all IP literals of one family with ports."""
    target = addresses.strip()
    if not target:
        raise ValueError("empty service address; expected host:port, dns:///name:port or ip:port,ip:port")
    if target.startswith(GRPC_SCHEMES) or "," not in target:
        return target
    entries = [entry.strip() for entry in target.split(",")]
    if not all(entries):
        raise ValueError(f"empty entry in the address list {addresses!r}")
    parsed = [_ip_and_port(entry, addresses) for entry in entries]
    families = {ip.version for ip, _ in parsed}
    if len(families) > 1:
        raise ValueError(f"the address list {addresses!r} mixes IPv4 and IPv6; gRPC takes one family per list "
                         "(list one family, or give a name with both kinds of records as dns:///name:port)")
    if families == {4}:
        return "ipv4:" + ",".join(f"{ip}:{port}" for ip, port in parsed)
    return "ipv6:" + ",".join(f"[{ip}]:{port}" for ip, port in parsed)


def _ip_and_port(entry: str, addresses: str) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]:
    """One `ip:port` / `[ipv6]:port` entry of a comma list."""
    host, sep, port = entry.rpartition(":")
    if not sep or not host:
        raise ValueError(f"{entry!r} in the address list {addresses!r} has no port; write ip:port")
    bracketed = host.startswith("[") and host.endswith("]")
    try:
        ip = ipaddress.ip_address(host[1:-1] if bracketed else host)
    except ValueError:
        raise ValueError(f"{entry!r} in the address list {addresses!r} is not an IP literal: a comma list takes "
                         "ip:port entries only; to reach every replica behind a host name use dns:///name:port "
                         "(one name whose DNS records list the replicas)") from None
    if ip.version == 6 and not bracketed:
        raise ValueError(f"{entry!r} in the address list {addresses!r}: write an IPv6 address in brackets, [addr]:port")
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{entry!r} in the address list {addresses!r} has no valid port (1-65535)")
    return ip, int(port)


def open_channel(target: str, extra_options: Sequence[tuple[str, Any]] = ()) -> grpc.aio.Channel:
    """An insecure aio channel to another mesh service (one or several replicas, round robin),
    propagating the caller's request id. `target` takes the forms in the module docstring."""
    return grpc.aio.insecure_channel(
        channel_target(target),
        options=(*CHANNEL_OPTIONS, *extra_options),
        interceptors=(
            _RequestIdUnaryUnary(),
            _RequestIdUnaryStream(),
            _RequestIdStreamUnary(),
            _RequestIdStreamStream(),
        ),
    )


def downstream_timeout(context: grpc.aio.ServicerContext | None, cap: float | None = None) -> float | None:
    """Seconds a downstream call may take: the caller's remaining time, at most `cap`."""
    remaining = context.time_remaining() if context is not None else None
    if remaining is None:
        return cap
    return min(remaining, cap) if cap is not None else remaining


def _with_request_id(details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
    request_id = current_context().get("request_id")
    metadata = list(details.metadata or ())
    if request_id and not any(k == REQUEST_ID_HEADER for k, _ in metadata):
        metadata.append((REQUEST_ID_HEADER, str(request_id)))
    return grpc.aio.ClientCallDetails(
        method=details.method,
        timeout=details.timeout,
        metadata=grpc.aio.Metadata(*metadata),
        credentials=details.credentials,
        wait_for_ready=details.wait_for_ready,
    )


class _RequestIdUnaryUnary(grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(_with_request_id(details), request)


class _RequestIdUnaryStream(grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(_with_request_id(details), request)


class _RequestIdStreamUnary(grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation: Any, details: Any, request_iterator: Any) -> Any:
        return await continuation(_with_request_id(details), request_iterator)


class _RequestIdStreamStream(grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(self, continuation: Any, details: Any, request_iterator: Any) -> Any:
        return await continuation(_with_request_id(details), request_iterator)
