"""Who is calling: a bearer token maps to a tenant.

Tokens come from a YAML file (`tokens: {<token>: <tenant>}`). Without a file the gateway runs in
open single-user mode: every caller is tenant "default". A tenant only ever sees its own jobs;
the job handlers answer NOT_FOUND for another tenant's job, so existence does not leak.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Iterable
from pathlib import Path

import yaml

from mocap_common.errors import Unauthenticated

OPEN_MODE_TENANT = "default"
_TENANT_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


class Tenancy:
    """Resolves `authorization: Bearer <token>` metadata to a tenant name."""

    def __init__(self, tokens: dict[str, str] | None) -> None:
        # Keyed by the token's SHA-256, so the lookup does not compare secrets byte by byte.
        self._by_digest = None if tokens is None else {_digest(t): tenant for t, tenant in tokens.items()}

    @classmethod
    def from_file(cls, path: Path | str | None) -> "Tenancy":
        """Open mode for an empty path; otherwise the file must exist and be well formed."""
        if not path:
            return cls(None)
        try:
            document = yaml.safe_load(Path(path).read_text())
        except (OSError, yaml.YAMLError) as exc:
            raise SystemExit(f"cannot read tokens file {path}: {exc}") from None
        tokens = (document or {}).get("tokens") if isinstance(document, dict) else None
        if not isinstance(tokens, dict) or not tokens:
            raise SystemExit(f"tokens file {path} must hold a non-empty mapping `tokens: {{<token>: <tenant>}}`")
        for token, tenant in tokens.items():
            if not isinstance(token, str) or len(token) < 8 or not isinstance(tenant, str) or not _TENANT_RE.match(tenant):
                raise SystemExit(f"tokens file {path}: tokens must be strings of 8+ characters and tenants "
                                 "1..64 characters of [A-Za-z0-9._-]")
        return cls(tokens)

    @property
    def open_mode(self) -> bool:
        return self._by_digest is None

    def tenant(self, metadata: Iterable[tuple[str, str | bytes]] | None) -> str:
        """The caller's tenant; UNAUTHENTICATED when a token is required and missing or unknown."""
        if self._by_digest is None:
            return OPEN_MODE_TENANT
        token = bearer_token(metadata)
        if not token:
            raise Unauthenticated("missing bearer token: send metadata \"authorization: Bearer <token>\"")
        digest = _digest(token)
        for known, tenant in self._by_digest.items():
            if hmac.compare_digest(known, digest):
                return tenant
        raise Unauthenticated("unknown bearer token")


def bearer_token(metadata: Iterable[tuple[str, str | bytes]] | None) -> str:
    for key, value in metadata or ():
        if key.lower() == "authorization":
            text = value.decode() if isinstance(value, bytes) else value
            scheme, _, token = text.strip().partition(" ")
            if scheme.lower() == "bearer":
                return token.strip()
    return ""


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()
