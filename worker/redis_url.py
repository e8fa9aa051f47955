"""Showing a queue (Redis) URL and a failure to reach it, without the password.

Every place that prints or logs a queue URL goes through :func:`masked`; every "cannot reach the queue" line
through :func:`unreachable`, which says why (refused, timed out, authentication failed, unknown host).
"""

from __future__ import annotations

import errno
import socket
from urllib.parse import urlsplit

MASK = "***"


def masked(url: str) -> str:
    """``url`` with its password (and the ``password=`` query parameter) replaced by ``***``."""
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:  # not parseable as a URL: show nothing of it that could be a secret
        return "<unparseable URL>" if "@" in url else url
    out = url
    if password is not None:
        userinfo, _, hostport = parts.netloc.rpartition("@")
        user = userinfo.partition(":")[0]
        out = out.replace(f"//{parts.netloc}", f"//{user}:{MASK}@{hostport}", 1)
    if parts.query:
        query = "&".join(
            f"{k}={MASK}" if k.lower() == "password" else f"{k}{sep}{v}"
            for k, sep, v in (item.partition("=") for item in parts.query.split("&"))
        )
        out = out.replace(f"?{parts.query}", f"?{query}", 1)
    return out


def _secret_free(text: str, url: str) -> str:
    try:
        password = urlsplit(url).password
    except ValueError:
        password = None
    if password:
        text = text.replace(password, MASK)
    return text.replace(url, masked(url))


def reason(exc: BaseException, url: str = "") -> str:
    """Why a Redis operation failed, in words: refused, timed out, authentication failed, unknown host, …"""
    import redis.exceptions as rex

    chain: list[BaseException] = []
    cause: BaseException | None = exc
    while cause is not None and cause not in chain:
        chain.append(cause)
        cause = cause.__cause__ or cause.__context__
    for c in chain:
        if isinstance(c, socket.gaierror):
            return "unknown host (DNS lookup failed)"
        if isinstance(c, ConnectionRefusedError):
            return "connection refused (is redis-server running there?)"
    text = " ".join(str(exc).split())
    lowered = text.lower()
    if isinstance(exc, rex.AuthenticationError) or any(
        k in lowered for k in ("wrongpass", "noauth", "invalid password", "invalid username-password")
    ):
        return "authentication failed (wrong or missing password)"
    if isinstance(exc, rex.AuthorizationError) or "noperm" in lowered:
        return "the Redis user is not allowed to do this (ACL)"
    if isinstance(exc, rex.TimeoutError) or any(isinstance(c, (socket.timeout, TimeoutError)) for c in chain):
        return "timed out"
    for c in chain:
        if isinstance(c, OSError) and c.errno == errno.ECONNREFUSED:
            return "connection refused (is redis-server running there?)"
    if "name or service not known" in lowered or "temporary failure in name resolution" in lowered:
        return "unknown host (DNS lookup failed)"
    if "connection refused" in lowered:
        return "connection refused (is redis-server running there?)"
    detail = _secret_free(text, url) if url else text
    return f"{type(exc).__name__}: {detail}" if detail else type(exc).__name__


def unreachable(url: str, exc: BaseException) -> str:
    """The one line for a queue that cannot be reached: the URL without its password, and why."""
    return f"cannot reach the queue at {masked(url)}: {reason(exc, url)}"


__all__ = ["MASK", "masked", "reason", "unreachable"]
