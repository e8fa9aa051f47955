"""Trust flags and verbs: ``--policy``, ``--insecure-policy``, ``--require-signed``, signing, key generation."""

from __future__ import annotations

import argparse
import getpass
import os
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from worker.registry import InvalidInput

from .options import add_bool

if TYPE_CHECKING:
    from worker.engine.trust import Admission, Signer, SigningConfig


def add_global_flags(parser: argparse.ArgumentParser) -> None:
    add_bool(parser, "--insecure-policy", help="run without any trust policy check (accept every image)")
    parser.add_argument(
        "--policy",
        dest="trust_policy",
        metavar="PATH",
        help="trust policy file (default: ~/.config/containers/policy.json, else /etc/containers/policy.json)",
    )


def add_copy_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--sign-by-sigstore-private-key",
        metavar="PATH",
        help="sign each written image with the sigstore private key at PATH (on workers: the worker's own file)",
    )
    p.add_argument(
        "--sign-passphrase-file",
        metavar="PATH",
        help="read the signing key's passphrase from the first line of PATH (default: $FERRY_SIGN_PASSPHRASE)",
    )
    p.add_argument(
        "--sign-identity",
        metavar="REFERENCE",
        help="identity written in the signatures (default: the destination reference)",
    )
    add_bool(p, "--require-signed", help="refuse images no signature was verified for, whatever the policy says")
    p.add_argument("--sign-by", help=argparse.SUPPRESS)
    p.add_argument("--sign-by-sq-fingerprint", help=argparse.SUPPRESS)
    p.add_argument("--sign-by-sigstore", help=argparse.SUPPRESS)


def admission(args: argparse.Namespace) -> Admission | None:
    """The trust policy copy and sync enforce; ``None`` when every image is accepted without a look."""
    from worker.engine.trust import Admission, TrustPolicy, default_policy_path

    require = bool(getattr(args, "require_signed", False) or getattr(args, "global_require_signed", None))
    if getattr(args, "insecure_policy", False):
        if require:
            raise InvalidInput("--require-signed cannot be used with --insecure-policy (nothing would be verified)")
        return None
    policy = TrustPolicy.load(getattr(args, "trust_policy", None) or default_policy_path())
    if policy.accepts_anything() and not require:
        return None
    return Admission(policy, require)


def signing_config(args: argparse.Namespace) -> SigningConfig | None:
    from worker.engine.trust import SigningConfig

    if getattr(args, "sign_by", None):
        raise InvalidInput(
            "--sign-by: GPG simple signing is not supported by Ferry; use --sign-by-sigstore-private-key"
        )
    if getattr(args, "sign_by_sq_fingerprint", None):
        raise InvalidInput(
            "--sign-by-sq-fingerprint: Sequoia-PGP simple signing is not supported by Ferry;"
            " use --sign-by-sigstore-private-key"
        )
    if getattr(args, "sign_by_sigstore", None):
        raise InvalidInput(
            "--sign-by-sigstore: keyless signing (Fulcio/Rekor) needs the network and is not supported;"
            " use --sign-by-sigstore-private-key"
        )
    key = getattr(args, "sign_by_sigstore_private_key", None)
    if not key:
        if getattr(args, "sign_passphrase_file", None) or getattr(args, "sign_identity", None):
            raise InvalidInput("--sign-passphrase-file and --sign-identity need --sign-by-sigstore-private-key")
        return None
    config = SigningConfig(key, getattr(args, "sign_passphrase_file", None), getattr(args, "sign_identity", None))
    config.validate()
    return config


def check_signable(config: SigningConfig | None, destinations: list[str]) -> None:
    if config is None:
        return
    for name in destinations:
        if not name.startswith("docker://"):
            raise InvalidInput(
                f"{name}: sigstore signatures are stored in a registry; signing needs a docker:// destination"
            )


def load_signer(config: SigningConfig | None) -> Signer | None:
    """The key, decrypted here (embedded runs): a wrong passphrase fails before anything is copied."""
    from worker.engine.trust import Signer

    return Signer(config, interactive=True) if config is not None else None


# -- verbs -----------------------------------------------------------------------------------------------------------


def _read_passphrase(path: str | None) -> bytes:
    if path:
        try:
            with open(path, "rb") as f:
                return f.read().split(b"\n", 1)[0].rstrip(b"\r")
        except OSError as exc:
            raise InvalidInput(f"cannot read the passphrase file {path}: {exc.strerror}") from None
    if not sys.stdin.isatty():
        raise InvalidInput("no passphrase: give --passphrase-file (standard input is not a terminal)")
    first = getpass.getpass("Enter passphrase for the private key: ")
    if first != getpass.getpass("Repeat the passphrase: "):
        raise InvalidInput("the passphrases do not match")
    return first.encode()


def generate_key(args: argparse.Namespace) -> int:
    from worker.engine.trust import generate_key_pair

    prefix = args.output_prefix
    private, public = f"{prefix}.private", f"{prefix}.pub"
    for path in (private, public):
        if os.path.exists(path):
            raise InvalidInput(f"refusing to overwrite {path}")
    pair = generate_key_pair(_read_passphrase(args.passphrase_file))
    fd = os.open(private, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pair.private_pem)
    fd = os.open(public, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(pair.public_pem)
    print(f"Key written to {private} and {public}")
    return 0


def standalone(args: argparse.Namespace) -> int:
    raise InvalidInput(
        f"{args.verb}: skopeo's standalone signatures are GPG simple signing, which Ferry does not support;"
        " sign with copy/sync --sign-by-sigstore-private-key and verify with a sigstoreSigned policy"
    )


def add_parsers(sub: Any, verb: Callable[..., argparse.ArgumentParser]) -> None:
    p = verb(
        "generate-sigstore-key", generate_key, "Generate a sigstore key pair (cosign-compatible, passphrase-encrypted)"
    )
    p.add_argument("--output-prefix", required=True, metavar="PREFIX", help="write PREFIX.private and PREFIX.pub")
    p.add_argument("--passphrase-file", metavar="PATH", help="read the passphrase from the first line of PATH")
    for name, what in (
        ("standalone-sign", "Create a GPG simple signature (not supported: refuses)"),
        ("standalone-verify", "Verify a GPG simple signature (not supported: refuses)"),
    ):
        p = verb(name, standalone, what)
        if name == "standalone-sign":
            # skopeo's flags, so the refusal names the verb rather than a flag
            p.add_argument("--output", "-o", help=argparse.SUPPRESS)
            p.add_argument("--passphrase-file", help=argparse.SUPPRESS)
        else:
            p.add_argument("--public-key-file", help=argparse.SUPPRESS)
        p.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
