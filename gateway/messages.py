"""Stage messages made fit to show a client: `safe_message` removes what belongs to the servers
(peer addresses, file paths, gRPC core's transport text); the removed detail stays in the log."""

from __future__ import annotations

import re

# What `safe_message` removes from a stage's message before a client sees it.
_CONTROL = re.compile(r"[\x00-\x1f\x7f]+")
# gRPC core's own error texts (a failed connect, a reset stream, its debug strings): from the first
# of these on, the text is the transport's, not the stage's, and is cut.
_GRPC_CORE_TEXT = re.compile(
    r"failed to connect to all addresses|failed to connect to remote host|connection refused|connection reset"
    r"|socket closed|broken pipe|endpoint (?:read|write) failed|stream removed|goaway|keepalive watchdog"
    r"|dns resolution failed|name resolution|no address(?:es)? added|unavailable subchannel|connect(?:ion)? failed"
    r"|transport closed|handshake|received (?:message )?larger than max|sent message larger than max"
    r"|received rst_stream|debug_error_string|grpc_status|grpc_message|created_time|os_error|errno"
    r"|\b(?:recvmsg|sendmsg|connect|getaddrinfo|setsockopt):|\bAioRpcError\b|_InactiveRpcError|\bgrpc_core::",
    re.IGNORECASE)
_ADDRESS = re.compile(
    r"\b(?:ipv4|ipv6|unix|unix-abstract|vsock|dns|xds|passthrough):[^\s,;()]+"  # gRPC peer and target URIs
    r"|\b[a-z][a-z0-9+.-]*://[^\s,;()]+"  # URLs
    r"|\[[0-9a-f:.%]*:[0-9a-f:.%]*\](?::\d{1,5})?"  # [ipv6]:port
    r"|(?<![\w:.])(?=[0-9a-f:]*::|(?:[0-9a-f]{1,4}:){5})(?:[0-9a-f]{0,4}:){2,7}[0-9a-f]{0,4}(?![\w:])"  # bare ipv6
    r"|(?<![\w.])\d{1,3}(?:\.\d{1,3}){3}(?::\d{1,5})?(?![\w.])"  # ipv4[:port]
    r"|(?<![\w.-])(?:localhost|[a-z0-9-]+(?:\.[a-z0-9-]+)+|[a-z][a-z0-9-]*(?=:\d{2,5}\b)):\d{2,5}\b",  # host:port
    re.IGNORECASE)
_PATH = re.compile(r"(?<![\w.])(?:~|\.{1,2})?/(?:[\w.+@-]+/)*[\w.+@-]+/?|(?<![\w])[a-z]:\\[^\s,;()]*", re.IGNORECASE)


def safe_message(message: str) -> str:
    """A stage's message fit to show a client: one line, bounded length, and nothing of the
    servers: no peer addresses (gRPC's "ipv4:…", "ipv6:[…]", host:port, IP literals, URLs), no
    file paths, and no text of gRPC core's own errors (from the first such phrase on, the rest
    is the transport's and is cut). What is removed is in the gateway's log."""
    text = _CONTROL.sub(" ", message)
    cut = _GRPC_CORE_TEXT.search(text)
    if cut is not None:
        text = text[:cut.start()].rstrip(" :;,-(<") + " (transport error)"
    text = _ADDRESS.sub("<address>", text)
    text = _PATH.sub("<path>", text)
    text = re.sub(r"\s+", " ", text).strip()
    text = text[:300]
    text += ")" * max(0, text.count("(") - text.count(")"))  # close what a cut left open
    return text or "no detail given"
