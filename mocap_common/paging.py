"""`page_size` / `page_token` pages (AIP-158) over a short list the server holds whole, such as
the smoother's checkpoints and the broker's devices.

A token is a keyset token, not an offset: it holds the sort key of the last item sent, and the
next page starts after that key, so an item added or removed between two calls makes no other item
repeat or vanish. It also names its list, so a token of one list is refused by another. Clients
treat it as opaque (it is base64url of JSON); a malformed or foreign one is INVALID_ARGUMENT on
"page_token".

`page_size` 0 is "everything in one page": these lists were unpaged before, and 0 (the proto3
default an old client sends) keeps their old answer. The unbounded lists (jobs, leases) page in
their stores, with their own default sizes.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Sequence
from typing import TypeVar

from mocap_common.errors import FieldViolation, InvalidArgument

MAX_PAGE_SIZE = 1000  # a larger page_size is clamped to this

T = TypeVar("T")
SortKey = tuple[str | int, ...]


def page_of(items: Sequence[T], key: Callable[[T], SortKey], page_size: int, page_token: str, *,
            list_name: str) -> tuple[list[T], str]:
    """The page of `items` that `page_size` and `page_token` ask for, and the next page's token
    ("" after the last page). `items` are in list order, with `key` strictly increasing along it
    (newest first: a negated number)."""
    if page_size < 0:
        raise InvalidArgument("page_size must be >= 0",
                              violations=[FieldViolation("page_size", f"must be 0..{MAX_PAGE_SIZE} (0 = every item)")])
    rest = list(items)
    if page_token:
        after = decode_token(page_token, list_name)
        try:
            rest = [item for item in rest if key(item) > after]
        except TypeError:  # a token whose key has other types than this list's keys
            raise _bad_token() from None
    size = min(page_size, MAX_PAGE_SIZE) if page_size else len(rest)
    if len(rest) <= size:
        return rest, ""
    page = rest[:size]
    return page, encode_token(list_name, key(page[-1]))


def encode_token(list_name: str, last_key: SortKey) -> str:
    raw = json.dumps({"l": list_name, "k": list(last_key)}, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_token(token: str, list_name: str) -> SortKey:
    try:
        data = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
        name, key = data["l"], data["k"]
    except (ValueError, KeyError, TypeError):
        raise _bad_token() from None
    if name != list_name or not isinstance(key, list) \
            or not all(isinstance(part, (str, int)) and not isinstance(part, bool) for part in key):
        raise _bad_token()
    return tuple(key)


def _bad_token() -> InvalidArgument:
    return InvalidArgument("invalid page_token", violations=[
        FieldViolation("page_token", "must be a next_page_token from a previous response of the same call")])
