"""Ferry's OCI distribution client: httpx and tenacity only, never Celery or Redis.

Import from here; the underscore modules are private.
"""

from __future__ import annotations

from ._errors import (
    Cancelled,
    ConnectionFailed,
    CopyFailed,
    DigestMismatch,
    FerryError,
    Forbidden,
    IntegrityError,
    InvalidDigest,
    InvalidInput,
    InvalidReference,
    ManifestError,
    NetworkError,
    NotFound,
    RegistryError,
    RequestTimeout,
    ServerError,
    SizeMismatch,
    TLSError,
    TooManyRequests,
    Unauthorized,
    UnknownHost,
    Unsupported,
    is_temporary,
)
from ._reference import DOCKER_HUB, Reference
from ._types import MANIFEST_ACCEPT, MANIFEST_TYPES, Descriptor, Digest, MediaType, Platform
from ._verify import VerifyingStream, verify_bytes, verify_stream

__all__ = [
    "DOCKER_HUB",
    "MANIFEST_ACCEPT",
    "MANIFEST_TYPES",
    "Cancelled",
    "ConnectionFailed",
    "CopyFailed",
    "Descriptor",
    "Digest",
    "DigestMismatch",
    "FerryError",
    "Forbidden",
    "IntegrityError",
    "InvalidDigest",
    "InvalidInput",
    "InvalidReference",
    "ManifestError",
    "MediaType",
    "NetworkError",
    "NotFound",
    "Platform",
    "Reference",
    "RegistryError",
    "RequestTimeout",
    "ServerError",
    "SizeMismatch",
    "TLSError",
    "TooManyRequests",
    "Unauthorized",
    "UnknownHost",
    "Unsupported",
    "VerifyingStream",
    "is_temporary",
    "verify_bytes",
    "verify_stream",
]
