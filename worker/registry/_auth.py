"""Registry authentication: Basic and Bearer token challenges, tokens cached per scope.

The client asks ``Authenticator.headers(scopes)`` before each request and calls
``Authenticator.challenge(response, scopes)`` on a 401. Credentials go only to
the registry host this authenticator belongs to and to the token realm that
registry names in its challenge; they are never logged or put in an error.
"""

from __future__ import annotations

import base64
import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import httpx

from ._credentials import Credentials
from ._documents import parse_token_answer
from ._errors import Forbidden, Unauthorized

_PARAM = re.compile(r'([a-zA-Z_]+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^,\s]*))')
#: Tokens are refreshed this many seconds before they expire.
_EXPIRY_MARGIN = 10.0
_DEFAULT_EXPIRES = 60.0


@dataclass(frozen=True)
class Challenge:
    scheme: str
    params: dict[str, str]

    @property
    def realm(self) -> str:
        return self.params.get("realm", "")

    @property
    def service(self) -> str:
        return self.params.get("service", "")

    @property
    def scope(self) -> str:
        return self.params.get("scope", "")

    @property
    def error(self) -> str:
        return self.params.get("error", "")


def parse_challenge(header: str) -> Challenge | None:
    """Parse a ``WWW-Authenticate`` header (the first challenge in it)."""
    header = header.strip()
    if not header:
        return None
    scheme, _, rest = header.partition(" ")
    params: dict[str, str] = {}
    for m in _PARAM.finditer(rest):
        value = m.group(2) if m.group(2) is not None else m.group(3)
        params[m.group(1).lower()] = value.replace('\\"', '"')
    return Challenge(scheme.lower(), params)


def repository_scope(repository: str, *actions: str) -> str:
    return f"repository:{repository}:{','.join(actions)}"


@dataclass
class _Token:
    value: str
    expires_at: float


class Authenticator:
    """Holds one registry host's credentials and the tokens obtained with them."""

    def __init__(
        self,
        host: str,
        credentials: Credentials | None,
        token_client: Callable[[], httpx.Client],
    ) -> None:
        self.host = host
        self._credentials = credentials
        self._token_client = token_client
        self._lock = threading.Lock()
        self._bearer: Challenge | None = None
        self._basic = False
        self._tokens: dict[tuple[str, ...], _Token] = {}
        self._refresh_token = credentials.identity_token if credentials else ""
        #: number of token requests made, for tests and metrics
        self.tokens_fetched = 0

    def headers(self, scopes: Sequence[str]) -> dict[str, str]:
        """Authorization header for a request needing ``scopes``, from what is already known."""
        if self._credentials is not None and self._credentials.registry_token:
            return {"Authorization": f"Bearer {self._credentials.registry_token}"}
        with self._lock:
            if self._bearer is not None:
                tok = self._tokens.get(self._key(scopes))
                if tok is not None and tok.expires_at > time.monotonic():
                    return {"Authorization": f"Bearer {tok.value}"}
                if tok is not None:
                    del self._tokens[self._key(scopes)]
            elif self._basic and self._credentials and self._credentials.username:
                return {"Authorization": self._basic_header()}
        if self._bearer is not None:
            key = self._key(scopes)
            return {"Authorization": f"Bearer {self._fetch_token(self._bearer, key, store_as=key)}"}
        return {}

    def challenge(self, response: httpx.Response, scopes: Sequence[str], *, attempt: int) -> bool:
        """Learn from a 401; return True when the request is worth sending again."""
        if self._credentials is not None and self._credentials.registry_token:
            return False  # the given token is all there is: never swap it for another
        ch = parse_challenge(response.headers.get("www-authenticate", ""))
        if ch is None:
            return False
        if ch.scheme == "basic":
            # a first 401 is worth one retry with the credentials, even when another thread has just learnt
            # that the host wants Basic (its request went out before); a 401 to a request that carried them is not
            if attempt > 0 or not (self._credentials and self._credentials.username):
                return False
            self._basic = True
            return True
        if ch.scheme != "bearer" or not ch.realm:
            return False
        key = self._key(scopes)
        with self._lock:
            self._bearer = ch
            self._tokens.pop(key, None)
        insufficient = ch.error == "insufficient_scope" and bool(ch.scope)
        if attempt == 0 or (attempt == 1 and insufficient):
            wanted = set(key)
        else:
            return False
        if insufficient:
            # The registry names the scope it wants: ask for that too, once.
            wanted |= set(ch.scope.split(" "))
        self._fetch_token(ch, sorted(wanted), store_as=key)
        return True

    @staticmethod
    def _key(scopes: Sequence[str]) -> tuple[str, ...]:
        return tuple(sorted(set(scopes)))

    def _basic_header(self) -> str:
        assert self._credentials is not None
        raw = f"{self._credentials.username}:{self._credentials.password}".encode()
        return "Basic " + base64.b64encode(raw).decode()

    def _fetch_token(self, ch: Challenge, scopes: Sequence[str], *, store_as: tuple[str, ...]) -> str:
        key = self._key(scopes)
        with self._lock:
            tok = self._tokens.get(store_as)
            if tok is not None and tok.expires_at > time.monotonic():
                return tok.value
        creds = self._credentials
        client = self._token_client()
        params: list[tuple[str, str | int | float | bool | None]] = []
        if ch.service:
            params.append(("service", ch.service))
        params.extend(("scope", s) for s in key)
        try:
            if self._refresh_token:
                form = dict(params)
                form.update(
                    grant_type="refresh_token",
                    refresh_token=self._refresh_token,
                    client_id="ferry",
                    scope=" ".join(key),
                )
                resp = client.post(ch.realm, data=form)
            else:
                headers = {}
                if creds is not None and creds.username:
                    headers["Authorization"] = self._basic_header()
                    params.append(("account", creds.username))
                resp = client.get(ch.realm, params=params, headers=headers)
        finally:
            self.tokens_fetched += 1
        if resp.status_code in (401, 403):
            cls = Unauthorized if resp.status_code == 401 else Forbidden
            raise cls(
                f"authentication to {self.host} failed: the token service refused the credentials"
                f" (status {resp.status_code})",
                status=resp.status_code,
            )
        if resp.status_code != 200:
            raise Unauthorized(
                f"authentication to {self.host} failed: token service answered {resp.status_code}",
                status=resp.status_code,
            )
        answer = parse_token_answer(resp.content, f"token answer from the token service of {self.host}")
        value = answer.token
        if answer.refresh_token:
            self._refresh_token = answer.refresh_token
        expires_in = answer.expires_in or _DEFAULT_EXPIRES
        expires_at = time.monotonic() + max(expires_in - _EXPIRY_MARGIN, 1.0)
        with self._lock:
            self._tokens[store_as] = _Token(value, expires_at)
        return value
