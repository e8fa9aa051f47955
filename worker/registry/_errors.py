"""Ferry's one error tree.

::

    FerryError
     +-- InvalidInput              bad reference, flag, file or platform
     |    +-- InvalidReference
     |    +-- InvalidDigest
     +-- RegistryError             the registry answered with an error status
     |    +-- Unauthorized         401 after authenticating
     |    +-- Forbidden            403 / DENIED
     |    +-- NotFound             404 / *_UNKNOWN
     |    +-- TooManyRequests      429 / TOOMANYREQUESTS (has retry_after)
     |    |    +-- HeldOff         a shared backoff says wait: the caller reschedules
     |    +-- ServerError          5xx / UNAVAILABLE
     |    +-- Unsupported          405 / UNSUPPORTED: the registry will not do it
     +-- NetworkError              the request never got an HTTP answer
     |    +-- UnknownHost
     |    +-- ConnectionFailed     refused, reset
     |    +-- RequestTimeout
     |    +-- TLSError
     +-- IntegrityError            bytes do not match what was promised
     |    +-- DigestMismatch
     |    +-- SizeMismatch
     +-- ManifestError             manifest too large, malformed or of an unknown type
     |    +-- MalformedDocument    a manifest, config, tag list, catalog or token answer of the wrong shape
     +-- CopyFailed                an image could not be copied (wraps the cause)
 +-- PolicyRejected            the trust policy refused the image (names the image, requirement, reason)
     +-- Cancelled                 the user interrupted
          +-- TimedOut             the command ran past --command-timeout

httpx errors are translated into this tree in exactly one place,
``_client.translate_transport_error``. ``is_temporary`` decides what is
retried; the policy follows go-containerregistry: retry 408, 429, 500, 502,
503, 504 and connection-level failures, never 401/403/404.

Error texts never contain credentials: the client builds them from the
method, the URL without query string, the status and the registry's error
codes and messages only.
"""

from __future__ import annotations


class FerryError(Exception):
    """Base of every error Ferry raises on purpose."""


class InvalidInput(FerryError):
    pass


class PolicyRejected(FerryError):
    """The trust policy refused an image: nothing of it is written."""


class InvalidReference(InvalidInput):
    pass


class InvalidDigest(InvalidInput):
    pass


class RegistryError(FerryError):
    def __init__(
        self,
        message: str,
        *,
        status: int = 0,
        codes: tuple[str, ...] = (),
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.codes = codes
        self.retry_after = retry_after


class Unauthorized(RegistryError):
    pass


class Forbidden(RegistryError):
    pass


class NotFound(RegistryError):
    pass


class TooManyRequests(RegistryError):
    pass


class HeldOff(TooManyRequests):
    """Every worker holds off this registry for a while (a shared backoff): retry later, not in place."""


class ServerError(RegistryError):
    pass


class Unsupported(RegistryError):
    pass


class NetworkError(FerryError):
    pass


class UnknownHost(NetworkError):
    pass


class ConnectionFailed(NetworkError):
    pass


class RequestTimeout(NetworkError):
    pass


class TLSError(NetworkError):
    pass


class IntegrityError(FerryError):
    pass


class DigestMismatch(IntegrityError):
    def __init__(self, what: str, expected: object, actual: object) -> None:
        super().__init__(f"digest mismatch for {what}: expected {expected}, got {actual}")
        self.expected = expected
        self.actual = actual


class SizeMismatch(IntegrityError):
    def __init__(self, what: str, expected: int, actual: int) -> None:
        super().__init__(f"size mismatch for {what}: expected {expected} bytes, got {actual}")
        self.expected = expected
        self.actual = actual


class ManifestError(FerryError):
    pass


class MalformedDocument(ManifestError):
    """A document from outside (manifest, index, config, tag list, catalog page, token answer) has the
    wrong shape: not JSON, nested too deeply, a field missing or of the wrong type (``_documents.py``)."""


class CopyFailed(FerryError):
    pass


class Cancelled(FerryError):
    pass


class TimedOut(Cancelled):
    pass


_TEMPORARY_STATUS = frozenset({408, 429, 500, 502, 503, 504})
_TEMPORARY_CODES = frozenset({"TOOMANYREQUESTS", "UNAVAILABLE"})


def is_temporary(exc: BaseException) -> bool:
    """True for failures worth retrying: throttling, 5xx, dropped connections, timeouts."""
    if isinstance(exc, (ConnectionFailed, RequestTimeout)):
        return True
    if isinstance(exc, RegistryError):
        if exc.status in (401, 403, 404):
            return False
        return exc.status in _TEMPORARY_STATUS or bool(_TEMPORARY_CODES.intersection(exc.codes))
    return False
