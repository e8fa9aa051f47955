"""Command-line flags shared by several verbs, spelled as skopeo spells them."""

from __future__ import annotations

import argparse
import functools
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

from worker.engine.registries_conf import RegistriesConf, RegistriesD, registries_d
from worker.engine.registries_conf import load as load_registries
from worker.engine.transports import ImageName, ImageSource, SideConfig
from worker.registry import Credentials, InvalidInput, RetryPolicy, parse_creds

#: Boolean flags that skopeo accepts as ``--flag``, ``--flag=true`` and ``--flag=false``.
BOOL_FLAGS: set[str] = set()


def parse_bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "t", "true", "yes", "y", "on"):
        return True
    if value in ("0", "f", "false", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"invalid boolean value {text!r} (use true or false)")


def add_bool(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup, *names: str, help: str, default: bool = False
) -> None:
    """A Go-style boolean flag: ``--x`` means true, ``--x=false`` false; a short ``-x`` means true."""
    longs = [n for n in names if n.startswith("--")]
    shorts = [n for n in names if not n.startswith("--")]
    BOOL_FLAGS.update(longs)
    action = parser.add_argument(*longs, type=parse_bool, default=default, metavar="BOOL", help=help)
    if shorts:
        # A short flag never takes the next word as its value (``-q SOURCE``); per parser, since the same
        # letter is a boolean in one verb and takes a value in another (``-n``).
        parser.add_argument(
            *shorts, dest=action.dest, action="store_const", const=True, default=default, help=f"same as {longs[0]}"
        )


def value_flags(parser: argparse.ArgumentParser, *, recurse: bool = True) -> set[str]:
    """Every option string, in the parser (and its sub-parsers), that takes exactly one value."""
    out: set[str] = set()
    stack = [parser]
    while stack:
        p = stack.pop()
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                if recurse:
                    stack.extend(action.choices.values())
            elif action.option_strings and action.nargs is None and action.option_strings[0] not in BOOL_FLAGS:
                out.update(action.option_strings)
    return out


def normalize_argv(argv: Sequence[str], takes_value: set[str] | None = None) -> list[str]:
    """Read flags as Go's pflag does, before argparse sees them.

    A bare boolean flag gets an explicit ``=true`` so argparse never eats the next
    word as its value; a flag that takes a value takes the next word even when it
    starts with ``-`` (``--password -secret``), which argparse would refuse.
    """
    takes_value = takes_value or set()
    out: list[str] = []
    passthrough = False
    args = list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        i += 1
        if passthrough:
            out.append(arg)
        elif arg == "--":
            passthrough = True
            out.append(arg)
        elif arg in BOOL_FLAGS:
            out.append(arg + "=true")
        elif arg in takes_value and i < len(args) and args[i].startswith("-") and args[i] != "-":
            value = args[i]
            i += 1
            out.append(f"{arg}={value}" if arg.startswith("--") else f"{arg}{value}")
        else:
            out.append(arg)
    return out


def parse_duration(text: str) -> float:
    """Go durations (``10s``, ``1m30s``, ``500ms``) or plain seconds."""
    try:
        return float(text)
    except ValueError:
        pass
    total = 0.0
    units = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
    pos = 0
    for m in re.finditer(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)", text):
        if m.start() != pos:
            break
        total += float(m.group(1)) * units[m.group(2)]
        pos = m.end()
    if pos != len(text) or not text:
        raise argparse.ArgumentTypeError(f"invalid duration {text!r} (e.g. 10s, 1m30s)")
    return total


def add_side_flags(
    parser: argparse.ArgumentParser,
    prefix: str = "",
    what: str = "the registry",
    creds_alias: str = "",
    *,
    docker_only: bool = False,
) -> None:
    """``--creds``, ``--authfile``, ``--tls-verify`` … with an optional ``src-``/``dest-`` prefix.

    ``creds_alias`` is skopeo's hidden old spelling (``--screds``/``--dcreds`` on copy).
    """
    p = f"--{prefix}"
    g = parser.add_argument_group(f"{prefix.rstrip('-') or 'registry'} access")
    g.add_argument(f"{p}authfile", metavar="PATH", help=f"path of the authentication file for {what}")
    g.add_argument(f"{p}creds", metavar="USERNAME[:PASSWORD]", help=f"credentials for {what}")
    if creds_alias:
        g.add_argument(f"--{creds_alias}", dest=f"{prefix.replace('-', '_')}creds", help=argparse.SUPPRESS)
    g.add_argument(
        f"{p}registry-token",
        metavar="TOKEN",
        help=f"a Bearer token sent as is to {what} (and to no other host)",
    )
    g.add_argument(f"{p}username", metavar="USERNAME", help=f"username for {what}")
    g.add_argument(f"{p}password", metavar="PASSWORD", help=f"password for {what}")
    g.add_argument(f"{p}cert-dir", metavar="PATH", help="use certificates (*.crt, *.cert, *.key) at PATH")
    add_bool(g, f"{p}no-creds", help=f"access {what} anonymously")
    BOOL_FLAGS.add(f"{p}tls-verify")
    g.add_argument(
        f"{p}tls-verify",
        type=parse_bool,
        default=None,
        metavar="BOOL",
        help="require HTTPS and verify certificates (default true; =false also allows plain HTTP)",
    )
    if not docker_only:
        # docker-daemon: only; refused in side_config (Ferry has no docker-daemon: transport)
        g.add_argument(f"--{prefix}daemon-host", metavar="HOST", help=argparse.SUPPRESS)
        g.add_argument(
            f"--{prefix}shared-blob-dir", metavar="DIRECTORY", help="oci: layouts keep their blobs in DIRECTORY"
        )


def add_shared_authfile(parser: argparse.ArgumentParser) -> None:
    """copy's and sync's ``--authfile``: both sides, unless ``--src-authfile``/``--dest-authfile`` say otherwise."""
    parser.add_argument("--authfile", metavar="PATH", help="path of the authentication file for both sides")
    # skopeo's deprecated ``copy --tls-verify`` (hidden): both sides, unless a prefixed flag says otherwise
    BOOL_FLAGS.add("--tls-verify")
    parser.add_argument("--tls-verify", dest="both_tls_verify", type=parse_bool, default=None, help=argparse.SUPPRESS)


def add_retry_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--retry-times", type=int, default=3, metavar="N", help="retry N times on temporary failures")
    parser.add_argument(
        "--retry-delay",
        type=parse_duration,
        default=None,
        metavar="DURATION",
        help="fixed delay between retries (default: exponential backoff)",
    )


def side_config(args: argparse.Namespace, prefix: str = "") -> SideConfig:
    key = prefix.replace("-", "_")

    def get(name: str) -> object:
        return getattr(args, key + name, None)

    # a flag given with an empty value is given: "" never falls back to anonymous or the auth file
    creds_text = get("creds")
    username = get("username")
    password = get("password")
    given = creds_text is not None or username is not None or password is not None
    if get("no_creds") and given:
        raise InvalidInput(f"--{prefix}no-creds cannot be used with --{prefix}creds or --{prefix}username")
    if creds_text is not None and (username is not None or password is not None):
        raise InvalidInput(f"--{prefix}creds and --{prefix}username/--{prefix}password cannot be used together")
    credentials = None
    if creds_text is not None:
        try:
            credentials = parse_creds(str(creds_text))
        except InvalidInput as exc:
            raise InvalidInput(f"--{prefix}creds: {exc}") from None
    elif username is not None or password is not None:
        if username is None or password is None:
            raise InvalidInput(f"--{prefix}username and --{prefix}password must be given together")
        if not username:
            raise InvalidInput(f"--{prefix}username: the username can't be empty")
        credentials = Credentials(username=str(username), password=str(password))
    if get("daemon_host"):
        raise InvalidInput(f"--{prefix}daemon-host: Ferry has no docker-daemon: transport")
    token = get("registry_token")
    if token is not None:
        if not str(token):
            raise InvalidInput(f"--{prefix}registry-token must not be empty")
        if credentials is not None or get("no_creds"):
            raise InvalidInput(
                f"--{prefix}registry-token cannot be used with --{prefix}creds, --{prefix}username"
                f" or --{prefix}no-creds"
            )
        credentials = Credentials(registry_token=str(token))
    retry_times = getattr(args, "retry_times", 3)
    if retry_times is not None and retry_times < 0:
        raise InvalidInput("--retry-times must be 0 or more")
    return SideConfig(
        tls_verify=effective_tls_verify(args, prefix),
        cert_dir=get("cert_dir"),  # type: ignore[arg-type]
        credentials=credentials,
        authfile=get("authfile") or getattr(args, "authfile", None) or os.environ.get("REGISTRY_AUTH_FILE"),  # type: ignore[arg-type]
        no_creds=bool(get("no_creds")),
        user_agent=user_agent(args),
        registries=registries_conf(args),
        shared_blob_dir=get("shared_blob_dir"),  # type: ignore[arg-type]
        retry=RetryPolicy(
            times=retry_times if retry_times is not None else 3, delay=getattr(args, "retry_delay", None)
        ),
    )


def effective_tls_verify(args: argparse.Namespace, prefix: str = "") -> bool | None:
    """The side's own ``--…tls-verify``, else copy's hidden ``--tls-verify``, else the global one (skopeo's order)."""
    for name in (prefix.replace("-", "_") + "tls_verify", "both_tls_verify", "global_tls_verify"):
        value = getattr(args, name, None)
        if value is not None:
            return bool(value)
    return None


def user_agent(args: argparse.Namespace) -> str:
    """``--user-agent-prefix P``: ``P ferry/X``, as skopeo sends ``P skopeo/X``."""
    from worker.registry import USER_AGENT

    prefix = getattr(args, "user_agent_prefix", None)
    return f"{prefix} {USER_AGENT}" if prefix else USER_AGENT


@functools.lru_cache(maxsize=8)
def _load_registries(path: str | None) -> RegistriesConf:
    return load_registries(path)


def registries_conf(args: argparse.Namespace) -> RegistriesConf:
    """``--registries-conf PATH``, else the default files (read once per process)."""
    return _load_registries(getattr(args, "registries_conf", None))


def queued_registries(args: argparse.Namespace, opened: Mapping[str, ImageSource]) -> dict[str, Any]:
    """registries.conf for a queued job's workers: this machine's entries, plus the endpoint each registry image
    was read from when its registry has mirrors (workers read where the plan was made, with the same TLS)."""
    from worker.engine.transports.registry import RegistrySource

    conf = registries_conf(args)
    pinned = dict(conf.pinned)
    for name, src in opened.items():
        user = ImageName.parse(name).reference
        if user is None or not isinstance(src, RegistrySource) or not conf.has_mirrors(user):
            continue
        for ref, insecure in conf.pull_sources(user):
            if ref == src.reference:
                pinned[str(user)] = (str(ref), insecure)
                break
    return replace(conf, pinned=pinned).to_json()


def signature_storage(args: argparse.Namespace) -> RegistriesD:
    """The parsed registries.d (``--registries.d DIR`` or the default): lookaside and sigstore-attachment
    settings per namespace, for signature code (``.for_reference(ref)``)."""
    return registries_d(getattr(args, "registries_d", None))
