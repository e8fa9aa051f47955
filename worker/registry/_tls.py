"""TLS settings per registry host, following the containers ``certs.d`` layout."""

from __future__ import annotations

import os
import ssl
from pathlib import Path

from ._errors import InvalidInput


def default_cert_dirs(host: str, env: dict[str, str] | None = None) -> list[Path]:
    env = dict(os.environ) if env is None else env
    home = env.get("HOME", str(Path.home()))
    return [
        Path(home) / ".config/containers/certs.d" / host,
        Path("/etc/containers/certs.d") / host,
        Path("/etc/docker/certs.d") / host,
    ]


def ssl_context(host: str, *, verify: bool = True, cert_dir: str | None = None) -> ssl.SSLContext:
    """Build the SSL context for ``host``.

    ``cert_dir`` (``--cert-dir``) replaces the default ``certs.d`` lookup: every
    ``*.crt`` in it is a CA added to the system pool; ``NAME.cert`` with
    ``NAME.key`` is a client certificate. With ``verify=False`` nothing is
    checked (self-signed certificates and plain HTTP are allowed).
    """
    if verify:
        ctx = ssl.create_default_context()
    else:
        # nothing is verified, so the system CA bundle (about 50 ms to load) is not needed
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if cert_dir is not None:
        if not Path(cert_dir).is_dir():
            raise InvalidInput(f"certificate directory {cert_dir} does not exist")
        dirs = [Path(cert_dir)]
    else:
        dirs = [d for d in default_cert_dirs(host) if d.is_dir()]
    for d in dirs:
        for crt in sorted(d.glob("*.crt")):
            if verify:
                try:
                    ctx.load_verify_locations(cafile=str(crt))
                except (ssl.SSLError, OSError) as exc:
                    raise InvalidInput(f"cannot load CA certificate {crt}: {exc}") from None
        for cert in sorted(d.glob("*.cert")):
            key = cert.with_suffix(".key")
            if not key.exists():
                raise InvalidInput(f"client certificate {cert} has no matching key {key.name}")
            try:
                ctx.load_cert_chain(str(cert), str(key))
            except (ssl.SSLError, OSError) as exc:
                raise InvalidInput(f"cannot load client certificate {cert}: {exc}") from None
        for key in sorted(d.glob("*.key")):
            if not key.with_suffix(".cert").exists():
                raise InvalidInput(f"client key {key} has no matching certificate {key.stem}.cert")
    return ctx
