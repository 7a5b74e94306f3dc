"""What no message shown to a gateway client may contain: peer addresses and IP literals, server
file paths, and the text of gRPC core's own errors (those stay in the logs)."""

from __future__ import annotations

import re

LEAKS = re.compile(
    r"ipv4|ipv6|unix:|127\.0\.0\.1|\d+\.\d+\.\d+\.\d+|::1|2001:db8|fe80|%5B|:5005\d|:443|:8080"
    r"|failed to connect|connection refused|connection reset|socket closed|debug_error_string|grpc_status"
    r"|created_time|/var/|/tmp/|/home/|/root/|\.internal|cluster\.local|C-ares|recvmsg",
    re.IGNORECASE)
