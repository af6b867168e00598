"""Passwords never reach the screen, a log, a tag, a param or a file: every URL is masked."""

from __future__ import annotations

import re
from typing import Any

_URL = re.compile(r"[a-zA-Z][a-zA-Z0-9+.-]*://\S*")  # a URL runs to the next blank
_QUERY_SECRETS = re.compile(r"(?P<key>[?&;](?:password|passwd|pwd|secret|token)=)[^&;\s]+",
                            re.IGNORECASE)


def mask_url(url: str) -> str:
    """The URL with its password (user:password@, ?password=) replaced by ***.

    The authority's user information is everything before its last "@" (RFC 3986: an "@"
    inside a password must be percent-encoded, but database drivers such as SQLAlchemy also
    read unencoded "@", "/" and quotes there, so the password runs from the first ":" after
    the scheme to the last "@" of the URL); a URL holding no "@" has no password to mask.
    """
    scheme, sep, rest = url.partition("://")
    if sep:
        userinfo, at, host = rest.rpartition("@")
        user, colon, _ = userinfo.partition(":")
        if at and colon:
            url = f"{scheme}://{user}:***@{host}"
    return _QUERY_SECRETS.sub(lambda m: f"{m['key']}***", url)


def mask_credentials(text: str) -> str:
    """Every URL of text with its password replaced by *** (mask_url)."""
    return _URL.sub(lambda m: mask_url(m.group(0)), text)


def masked(value: Any) -> Any:
    """A nested structure of dicts, lists and values with every string masked."""
    if isinstance(value, str):
        return mask_credentials(value)
    if isinstance(value, dict):
        return {k: masked(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(masked(v) for v in value)
    return value
