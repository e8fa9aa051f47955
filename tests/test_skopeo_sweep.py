"""The class of bug behind issue 11: every verb and every flag of Debian's skopeo 1.9 (read from
``/usr/bin/skopeo VERB --help``) is either accepted by Ferry or refused with one ``Error:`` line naming it, never
an "unknown flag" usage error, argparse's "unrecognized arguments", an internal error or a traceback; and the
compatibility table in docs/cli.md lists every one of them.

Ferry runs in-process (``producer.cli.main``) against local names that fail fast (a missing ``dir:``, a closed
port), so each flag is parsed and dispatched without a network.
"""

from __future__ import annotations

import io
import re
import subprocess
import sys
from pathlib import Path

import pytest

from producer.cli import main
from tests.harness.peer import SKOPEO_BIN

DOCS = Path(__file__).resolve().parent.parent / "docs" / "cli.md"
#: hidden in skopeo 1.9's command list, but there
HIDDEN_VERBS = ("layers",)
_TYPES = {"string", "strings", "int", "ints", "duration", "stringArray", "uint", "uint8"}


def _help(*words: str) -> str:
    return subprocess.run([SKOPEO_BIN, *words, "--help"], capture_output=True, text=True, timeout=30).stdout


def skopeo_verbs() -> list[str]:
    text = _help().split("Available Commands:", 1)[1].split("Flags:", 1)[0]
    return [line.split()[0] for line in text.strip().splitlines()] + list(HIDDEN_VERBS)


def skopeo_flags(*words: str) -> list[tuple[str, bool]]:
    """(long flag, takes a value) for each flag of ``skopeo WORDS --help`` (not --help itself)."""
    out = []
    for line in _help(*words).split("Flags:", 1)[1].splitlines():
        m = re.match(r"\s+(?:-\w, )?(--[\w.-]+)(?: (\S+))?", line)
        if m is None or m.group(1) == "--help":
            continue
        kind = m.group(2) or ""
        out.append((m.group(1), kind in _TYPES or bool(re.fullmatch(r"[A-Z][A-Z_\[\]:]*", kind))))
    return out


GLOBAL = skopeo_flags()
VERBS = skopeo_verbs()
#: what makes each verb fail fast, after its flags are read
ARGS = {
    "copy": ["dir:/nonexistent-ferry-sweep", "dir:/nonexistent-ferry-sweep-out/x"],
    "sync": ["--src", "dir", "--dest", "dir", "/nonexistent-ferry-sweep", "/nonexistent-ferry-sweep-out"],
    "inspect": ["dir:/nonexistent-ferry-sweep"],
    "layers": ["dir:/nonexistent-ferry-sweep"],
    "list-tags": ["docker-archive:/nonexistent-ferry-sweep.tar"],
    "delete": ["--retry-times=0", "docker://127.0.0.1:1/x:y"],
    "login": ["--get-login", "127.0.0.1:1"],
    "logout": ["127.0.0.1:1"],
    "manifest-digest": ["/nonexistent-ferry-sweep.json"],
    "standalone-sign": ["m.json", "docker.io/x:y", "FP"],
    "standalone-verify": ["m.json", "docker.io/x:y", "FP", "sig"],
    "help": [],
}
#: a valid value where the flag checks its value (otherwise "x", or a number for numbers)
VALUES = {
    "--format": "v2s2", "--multi-arch": "system", "--src": "dir", "--dest": "dir", "--dest-compress-format": "gzip",
    "--dest-compress-level": "1", "--retry-times": "0", "--retry-delay": "1s", "--command-timeout": "1m",
    "--image-parallel-copies": "1", "--encrypt-layer": "0", "--additional-tag": "x/y:z",
}  # fmt: skip
CASES = [(verb, flag, value) for verb in VERBS for flag, value in skopeo_flags(verb) if verb != "help"]


def run_ferry(argv: list[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> tuple[int, str]:
    out, err = io.TextIOWrapper(io.BytesIO()), io.StringIO()
    monkeypatch.setattr(sys, "stdout", out)
    monkeypatch.setattr(sys, "stderr", err)
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setenv("REGISTRY_AUTH_FILE", str(tmp_path / "auth.json"))
    monkeypatch.chdir(tmp_path)
    try:
        code = main(argv)
    except SystemExit as exc:
        code = int(exc.code or 0) if not isinstance(exc.code, str) else 1
        if isinstance(exc.code, str):
            err.write(exc.code)
    return code, err.getvalue()


def _value(flag: str, takes_value: bool) -> list[str]:
    return [f"{flag}={VALUES.get(flag, '1' if 'retry' in flag or 'level' in flag else 'x')}"] if takes_value else [flag]


def check(code: int, err: str, what: str) -> None:
    bad_words = ["unrecognized arguments", "unknown flag", "internal error", "invalid choice"]
    if "--debug" not in what.split():  # --debug adds the traceback on purpose
        bad_words.append("Traceback")
    for bad in bad_words:
        assert bad not in err, f"{what}: {err}"
    assert code != 2 or "manifest unknown" in err.lower(), f"{what}: exit 2: {err}"
    errors = [line for line in err.splitlines() if line.startswith("Error:")]
    assert len(errors) <= 1, f"{what}: {err}"


@pytest.mark.parametrize(("verb", "flag", "takes_value"), CASES, ids=[f"{v} {f}" for v, f, _ in CASES])
def test_every_skopeo_flag_is_accepted_or_refused_by_name(
    verb: str, flag: str, takes_value: bool, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    argv = ["--insecure-policy", verb, *_value(flag, takes_value), *ARGS[verb]]
    code, err = run_ferry(argv, monkeypatch, tmp_path)
    check(code, err, " ".join(argv))


@pytest.mark.parametrize(("flag", "takes_value"), GLOBAL, ids=[f for f, _ in GLOBAL])
def test_every_global_flag(flag: str, takes_value: bool, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    argv = [*_value(flag, takes_value), "--insecure-policy", "inspect", *ARGS["inspect"]]
    code, err = run_ferry(argv, monkeypatch, tmp_path)
    check(code, err, " ".join(argv))
    assert code != 0 or flag == "--version"  # the missing image is still an error


def test_every_verb_exists(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for verb in VERBS:
        code, err = run_ferry([verb, "--help"], monkeypatch, tmp_path)
        assert code == 0, (verb, err)


def test_the_compatibility_table_lists_every_verb_and_flag() -> None:
    text = DOCS.read_text().split("## skopeo compatibility", 1)[1]
    words = {w.lstrip("-") for w in re.findall(r"[\w.-]+", text)}
    missing = [verb for verb in VERBS if f"`{verb}" not in text]
    for verb, flag, _ in CASES:
        base = flag.removeprefix("--")
        short = re.sub(r"^(src|dest)-", "", base)
        if flag not in text and short not in words:
            missing.append(f"{verb} {flag}")
    for flag, _ in GLOBAL:
        if flag not in text:
            missing.append(flag)
    assert not missing, missing


GLOBAL_AFTER = [
    (verb, flag, value) for verb in VERBS if verb != "help" for flag, value in GLOBAL if flag != "--version"
]


@pytest.mark.parametrize(("verb", "flag", "takes_value"), GLOBAL_AFTER, ids=[f"{v} {f}" for v, f, _ in GLOBAL_AFTER])
def test_every_global_flag_after_the_verb(
    verb: str, flag: str, takes_value: bool, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """skopeo's global flags are cobra persistent flags: ``skopeo copy --insecure-policy …`` works too."""
    argv = [verb, *_value(flag, takes_value), *ARGS[verb]]
    if flag != "--insecure-policy":
        argv.insert(1, "--insecure-policy")
    code, err = run_ferry(argv, monkeypatch, tmp_path)
    check(code, err, " ".join(argv))
