"""Limits more than one service checks the same way: one definition, so the gateway never accepts
what a stage service then refuses (or the other way round)."""

from __future__ import annotations

import re

# Most people one job (gateway JobOptions.max_persons) or one Track call (TrackHeader.max_persons)
# may follow at once; 0 in a request means the service's default.
MAX_PERSONS_LIMIT = 16

# An idempotency key (AIP-155 `request_id`: CreateJob's upload header, GetUpload, Acquire).
REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
REQUEST_ID_RULE = "must be 1..128 characters of [A-Za-z0-9._:-]"  # the FieldViolation text


def is_valid_request_id(request_id: str) -> bool:
    return REQUEST_ID_RE.match(request_id) is not None
