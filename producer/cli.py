"""``ferry``: skopeo's verbs and flags, plus the distributed ones (worker, job).

Every error a user can cause ends as one line on stderr and a non-zero exit;
``--debug`` adds the traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
import traceback
from collections.abc import Callable, Sequence
from typing import Any

# httpx imports its own command line (rich, click, pygments) when those are installed, as they are here
# (Celery needs click): a tenth of a second of CPU at every start of ferry, for a CLI ferry never calls.
# A None entry makes that import fail, and httpx then goes without it (its __init__ expects an ImportError).
sys.modules.setdefault("httpx._main", None)  # type: ignore[arg-type]
# tenacity likewise imports tornado when it is installed (Flower brings it), and with it asyncio, logging.handlers
# and more: a few hundredths of a second at every start, for tornado support ferry never uses.
sys.modules.setdefault("tornado", None)  # type: ignore[arg-type]

from worker.registry import FerryError, InvalidInput, NotFound  # noqa: E402

from . import deadline, verbs  # noqa: E402
from .completion import _verbs  # noqa: E402
from .options import (  # noqa: E402
    BOOL_FLAGS,
    add_bool,
    add_retry_flags,
    add_side_flags,
    normalize_argv,
    parse_bool,
    value_flags,
)

VERSION = "0.1.0"

EXIT_ERROR = 1
#: a usage error (unknown flag or command, missing argument) exits 1, as skopeo (logrus.Fatal): 2 would read
#: as "no such image" to a script written for skopeo >= 1.10
EXIT_USAGE = 1
EXIT_INTERRUPTED = 130
#: skopeo ≥ 1.10 exits 2 when the source image does not exist (cmd/skopeo isNotFoundImageError)
EXIT_NOT_FOUND = 2

Handler = Callable[[argparse.Namespace], int]


class _Formatter(argparse.HelpFormatter):
    """Show Go-style booleans as skopeo does: ``--all[=BOOL]``, not ``--all BOOL``."""

    def _format_args(self, action: argparse.Action, default_metavar: str) -> str:
        if action.metavar == "BOOL":
            return "[=BOOL]"
        return super()._format_args(action, default_metavar)

    def _format_action_invocation(self, action: argparse.Action) -> str:
        if action.metavar == "BOOL" and action.option_strings:
            return ", ".join(f"{o}[=BOOL]" if o.startswith("--") else o for o in action.option_strings)
        return super()._format_action_invocation(action)

    def format_help(self) -> str:
        # usage lines: argparse puts a space between an option and its metavar
        return super().format_help().replace(" [=BOOL]", "[=BOOL]")


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _Formatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_USAGE, f"Error: {message} (see '{self.prog} --help')\n")


def _platform_overrides(p: argparse.ArgumentParser, *, sub: bool = False) -> None:
    # on a verb the default is SUPPRESS, so ``ferry --override-arch X inspect`` keeps the global value
    default = argparse.SUPPRESS if sub else None
    p.add_argument("--override-os", metavar="OS", default=default, help="use OS instead of the running OS")
    p.add_argument("--override-arch", metavar="ARCH", default=default, help="use ARCH instead of this machine's")
    p.add_argument(
        "--override-variant", metavar="VARIANT", default=default, help="use VARIANT instead of this machine's"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="ferry",
        description="Move container images between registries, directories and archives; at scale with Celery.",
    )
    BOOL_FLAGS.add("--tls-verify")
    add_bool(parser, "--debug", help="show debug output and tracebacks")
    # skopeo's hidden, deprecated global --tls-verify (before the verb): the default for every side
    parser.add_argument("--tls-verify", dest="global_tls_verify", type=parse_bool, default=None, help=argparse.SUPPRESS)
    parser.add_argument(
        "--user-agent-prefix", metavar="PREFIX", help="prefix to add to the User-Agent sent to registries"
    )
    parser.add_argument("--tls-details", metavar="PATH", help=argparse.SUPPRESS)
    from . import trust_cmd

    trust_cmd.add_global_flags(parser)
    # current skopeo's global --require-signed (copy and sync honour it, as their own flag)
    BOOL_FLAGS.add("--require-signed")
    parser.add_argument(
        "--require-signed",
        dest="global_require_signed",
        type=parse_bool,
        default=None,
        metavar="BOOL",
        help="refuse images no signature was verified for, whatever the policy says (copy, sync)",
    )
    parser.add_argument(
        "--registries-conf", metavar="PATH", help="registries.conf to use (mirrors, prefix rewrites, blocked, insecure)"
    )
    parser.add_argument(
        "--registries.d", dest="registries_d", metavar="DIR", help="registries.d directory (signature storage)"
    )
    parser.add_argument("--tmpdir", help="directory for temporary files (archives)")
    parser.add_argument(
        "--command-timeout",
        type=_duration,
        default=None,
        metavar="DURATION",
        help="stop the whole command after DURATION (30s, 5m, 1h30m); nothing incomplete is committed",
    )
    _platform_overrides(parser)
    parser.add_argument("--version", "-v", action="version", version=f"ferry version {VERSION}")
    sub = parser.add_subparsers(dest="verb", metavar="COMMAND", parser_class=_Parser)

    def verb(name: str, handler: Handler, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        p.set_defaults(handler=handler)
        return p

    p = verb("inspect", verbs.inspect, "Inspect an image: its manifest, config and tags")
    add_bool(p, "--raw", help="print the raw manifest (or with --config the raw config) without changes")
    add_bool(p, "--config", help="print the image's config instead of the summary")
    add_bool(p, "--no-tags", "-n", help="do not list the repository's tags")
    p.add_argument("--format", "-f", metavar="TEMPLATE", help="format the output with a Go template")
    p.add_argument(
        "--manifest-digest",
        metavar="ALGORITHM",
        choices=("sha256", "sha512"),
        help="algorithm of the Digest shown (sha256, sha512; default sha256)",
    )
    _platform_overrides(p, sub=True)
    add_side_flags(p)
    add_retry_flags(p)
    p.add_argument("image", metavar="IMAGE-NAME")

    p = verb("help", lambda a: _help(parser, a.command), "Help about any command")
    p.add_argument("command", nargs="*", metavar="COMMAND")

    p = verb("completion", _completion, "Generate the autocompletion script for the specified shell")
    p.add_argument("shell", choices=("bash", "zsh", "fish", "powershell"), metavar="SHELL")

    p = verb("list-tags", verbs.list_tags, "List the tags of a repository")
    add_side_flags(p, docker_only=True)
    add_retry_flags(p)
    p.add_argument("repository", metavar="REPOSITORY-NAME")

    p = verb("manifest-digest", verbs.manifest_digest, "Compute the digest of a manifest file")
    p.add_argument("manifest", metavar="MANIFEST")

    p = verb("delete", verbs.delete, "Delete an image from a registry")
    add_side_flags(p)
    add_retry_flags(p)
    p.add_argument("image", metavar="IMAGE-NAME")

    p = verb("layers", verbs.layers, "Get layers of IMAGE-NAME (deprecated: use copy)")
    add_side_flags(p)
    add_retry_flags(p)
    p.add_argument("image", metavar="IMAGE-NAME")
    p.add_argument("layers", nargs="*", metavar="LAYER")

    p = verb("login", verbs.login, "Log in to a registry and store the credentials")
    p.add_argument("--authfile", metavar="PATH", help="path of the authentication file")
    p.add_argument(
        "--compat-auth-file", metavar="PATH", help="path of a Docker-compatible config file to update instead"
    )
    p.add_argument("--username", "-u", metavar="USERNAME")
    p.add_argument("--password", "-p", metavar="PASSWORD")
    add_bool(p, "--password-stdin", help="read the password from standard input")
    add_bool(p, "--get-login", help="print the username stored for the registry")
    p.add_argument("--cert-dir", metavar="PATH")
    p.add_argument("--tls-verify", type=_bool_or_none, default=None, metavar="BOOL")
    add_bool(p, "--verbose", "-v", help="say which file the credentials were written to")
    p.add_argument("registry", metavar="REGISTRY")

    p = verb("logout", verbs.logout, "Remove stored credentials for a registry")
    p.add_argument("--authfile", metavar="PATH", help="path of the authentication file")
    p.add_argument(
        "--compat-auth-file", metavar="PATH", help="path of a Docker-compatible config file to update instead"
    )
    add_bool(p, "--all", "-a", help="remove the credentials of every registry")
    # skopeo's logout takes it too; removing a login contacts no registry, so it changes nothing (as in skopeo)
    p.add_argument("--tls-verify", type=_bool_or_none, default=None, metavar="BOOL", help=argparse.SUPPRESS)
    p.add_argument("registry", nargs="?", metavar="REGISTRY")

    from . import copy_cmd

    copy_cmd.add_parsers(sub, verb)
    from . import distributed, sync_cmd

    sync_cmd.add_parsers(sub, verb)
    from . import lifecycle_cmd

    lifecycle_cmd.add_parsers(sub, verb)
    distributed.add_parsers(sub, verb)
    trust_cmd.add_parsers(sub, verb)
    return parser


def _duration(text: str) -> tuple[float, str]:
    from .options import parse_duration

    return parse_duration(text), text


def _bool_or_none(text: str) -> bool:
    return parse_bool(text)


def _help(parser: argparse.ArgumentParser, words: list[str]) -> int:
    """``ferry help [VERB [SUB]]``: the same text as ``--help`` there."""
    target = parser
    for word in words:
        sub = _verbs(target).get(word)
        if sub is None:
            raise InvalidInput(f"unknown help topic {' '.join(words)!r}")
        target = sub
    target.print_help()
    return 0


def _completion(args: argparse.Namespace) -> int:
    from .completion import script

    sys.stdout.write(script(build_parser(), args.shell))
    return 0


def parse_args(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """Parse as skopeo's pflag would: flags read per verb, and an unknown flag named by itself."""
    verbs = _verbs(parser)
    top_values = value_flags(parser, recurse=False)
    split = len(argv)
    i = 0
    while i < len(argv):
        word = argv[i]
        if word == "--":
            break
        if not word.startswith("-") or word == "-":
            split = i
            break
        i += 2 if word in top_values else 1
    verb = verbs.get(argv[split]) if split < len(argv) else None
    head = argv[:split]
    rest = argv[split + 1 :]
    if verb is not None:
        # skopeo's global flags are cobra persistent flags: accepted after the verb too (``skopeo copy --debug``)
        moved, rest = _global_flags_after(parser, verb, rest, top_values)
        head = head + moved
    words = normalize_argv(head, top_values)
    if verb is not None:
        words.append(argv[split])
        words += normalize_argv(rest, value_flags(verb))
    else:
        words += argv[split:]
    args, extras = parser.parse_known_args(words)
    if extras:
        target = verb or parser
        unknown = next((w for w in extras if w.startswith("-") and w != "-"), None)
        if unknown is not None:
            target.error(f"unknown flag: {unknown.split('=', 1)[0]}")
        target.error(f"unexpected argument {extras[0]!r}")
    return args


def _global_flags_after(
    parser: argparse.ArgumentParser, verb: argparse.ArgumentParser, rest: list[str], top_values: set[str]
) -> tuple[list[str], list[str]]:
    """Split the words after the verb into global flags the verb does not define itself (with their values)
    and the verb's own words. ``--version``/``-v`` and ``--help`` stay where they are (not persistent)."""
    own = {o for a in verb._actions for o in a.option_strings}
    verb_values = value_flags(verb)
    top = {
        o
        for a in parser._actions
        if not isinstance(a, argparse._SubParsersAction)
        for o in a.option_strings
        if o not in ("-h", "--help", "-v", "--version")
    }
    moved: list[str] = []
    kept: list[str] = []
    i = 0
    while i < len(rest):
        word = rest[i]
        if word == "--":
            kept += rest[i:]
            break
        name = word.split("=", 1)[0]
        takes = "=" not in word and i + 1 < len(rest)
        if name in top and name not in own:
            moved.append(word)
            if takes and name in top_values:
                moved.append(rest[i + 1])
                i += 1
        else:
            kept.append(word)
            if takes and name in verb_values:
                kept.append(rest[i + 1])  # a value, even one that looks like a flag
                i += 1
        i += 1
    return moved, kept


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parse_args(parser, list(sys.argv[1:] if argv is None else argv))
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    if not args.debug:
        # httpx logs every request at INFO; keep them out unless asked
        logging.getLogger("httpx").setLevel(logging.WARNING)
    if args.tmpdir:
        # archives are unpacked / staged here (skopeo's --tmpdir)
        import os
        import tempfile

        os.environ["TMPDIR"] = args.tmpdir
        tempfile.tempdir = None
    if args.tls_details:
        print(
            "Error: --tls-details: Ferry cannot apply a containers-tls-details.yaml file"
            " (TLS versions and ciphers are OpenSSL's defaults)",
            file=sys.stderr,
        )
        return EXIT_ERROR
    handler: Handler | None = getattr(args, "handler", None)
    if handler is not None and getattr(args, "registries_d", None):
        from .options import signature_storage

        try:
            signature_storage(args)  # a broken registries.d is an error up front, as in skopeo
        except FerryError as exc:
            print(f"Error: {_one_line(str(exc))}", file=sys.stderr)
            return EXIT_ERROR
    if handler is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    if args.command_timeout:
        deadline.arm(args.command_timeout[0], args.command_timeout[1])
    code = _run(handler, args)
    if args.command_timeout:
        if deadline.expired():
            # threads still stuck in a transfer must not hold the exit past the deadline
            deadline.exit_now(code)
        deadline.disarm()
    return code


def _run(handler: Handler, args: argparse.Namespace) -> int:
    try:
        return handler(args)
    except KeyboardInterrupt:
        print("Error: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except FerryError as exc:
        if args.debug:
            traceback.print_exc()
        # an error made of several problems (a sync file) prints one line per problem
        for problem in getattr(exc, "problems", None) or (str(exc),):
            print(f"Error: {_one_line(problem)}", file=sys.stderr)
        return EXIT_NOT_FOUND if image_not_found(exc) else EXIT_ERROR
    except BrokenPipeError:
        return EXIT_ERROR
    except OSError as exc:
        if args.debug:
            traceback.print_exc()
        print(f"Error: {_one_line(str(exc))}", file=sys.stderr)
        return EXIT_ERROR
    except Exception as exc:  # a bug: still one line, with the detail under --debug
        if args.debug:
            traceback.print_exc()
        lost = _lost_queue(exc)
        if lost:
            print(f"Error: {lost}", file=sys.stderr)
            return EXIT_ERROR
        print(f"Error: internal error: {type(exc).__name__}: {_one_line(str(exc))} (run with --debug)", file=sys.stderr)
        return EXIT_ERROR


def _lost_queue(exc: Exception) -> str | None:
    """A Redis or kombu failure after the queue was first reached (Redis went away): say so, password masked."""
    module = type(exc).__module__ or ""
    if not module.startswith(("redis", "kombu")):
        return None
    import os

    from worker.redis_url import unreachable

    return unreachable(os.environ.get("FERRY_QUEUE", ""), exc)


def image_not_found(exc: BaseException) -> bool:
    """skopeo's ``isNotFoundImageError``: a registry's MANIFEST_UNKNOWN, or no such image in an OCI layout/archive."""
    if not isinstance(exc, NotFound):
        return False
    return "MANIFEST_UNKNOWN" in exc.codes or "no image named" in str(exc)


def _one_line(text: str) -> str:
    return " ".join(text.split())


if __name__ == "__main__":
    sys.exit(main())
