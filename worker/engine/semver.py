"""Semantic versions and constraints, as skopeo's ``images-by-semver`` reads them (Masterminds/semver syntax).

Supported: comparison operators (``=``, ``!=``, ``>``, ``>=``, ``<``, ``<=``), ``~`` and ``^`` ranges,
wildcards (``1.2.x``, ``1.*``), hyphen ranges (``1.2 - 1.4``), ``,`` or space for AND, ``||`` for OR.
As in Masterminds, a pre-release version only matches a constraint that names a pre-release (here: an
``||`` alternative that names one, so ``>=2.0.0-0 <3`` selects ``2.1.0-rc.1``, where Masterminds would need
every term to name one).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from worker.registry import InvalidInput

_VERSION = re.compile(
    r"^v?(?P<major>0|[1-9]\d*)(?:\.(?P<minor>0|[1-9]\d*))?(?:\.(?P<patch>0|[1-9]\d*))?"
    r"(?:-(?P<pre>[0-9A-Za-z.-]+))?(?:\+(?P<build>[0-9A-Za-z.-]+))?$"
)


@dataclass(frozen=True)
class Version:
    major: int
    minor: int
    patch: int
    pre: tuple[str, ...] = ()

    @classmethod
    def parse(cls, text: str) -> Version | None:
        m = _VERSION.match(text.strip())
        if not m:
            return None
        pre = tuple(m.group("pre").split(".")) if m.group("pre") else ()
        return cls(int(m.group("major")), int(m.group("minor") or 0), int(m.group("patch") or 0), pre)

    def _key(self) -> tuple[int, int, int, int, tuple[tuple[int, int | str], ...]]:
        pre_key = tuple((0, int(p)) if p.isdigit() else (1, p) for p in self.pre)
        return (self.major, self.minor, self.patch, 0 if self.pre else 1, pre_key)

    def __lt__(self, other: Version) -> bool:
        return self._key() < other._key()

    def __le__(self, other: Version) -> bool:
        return self._key() <= other._key()

    def __gt__(self, other: Version) -> bool:
        return self._key() > other._key()

    def __ge__(self, other: Version) -> bool:
        return self._key() >= other._key()


_TERM = re.compile(
    r"^(?P<op>!=|>=|<=|=>|=<|>|<|=|~>|~|\^)?\s*(?P<ver>v?[0-9xX*]+(?:\.[0-9xX*]+){0,2}(?:-[0-9A-Za-z.-]+)?)$"
)


def _bound(ver: str) -> tuple[Version, int]:
    """The version with wildcards as zero, and how many leading parts were given (1-3)."""
    parts = ver.lstrip("vV").split("-", 1)
    nums = parts[0].split(".")
    given = 0
    vals = []
    for n in nums:
        if n in ("x", "X", "*"):
            break
        vals.append(int(n))
        given += 1
    while len(vals) < 3:
        vals.append(0)
    pre = tuple(parts[1].split(".")) if len(parts) > 1 else ()
    return Version(vals[0], vals[1], vals[2], pre), given


def _next(v: Version, given: int) -> Version:
    if given <= 1:
        return Version(v.major + 1, 0, 0)
    if given == 2:
        return Version(v.major, v.minor + 1, 0)
    return Version(v.major, v.minor, v.patch + 1)


_PART = r"v?[0-9xX*]+(?:\.[0-9xX*]+){0,2}(?:-[0-9A-Za-z.-]+)?"
#: ``A - B``: Masterminds rewrites it to ``>= A, <= B`` before anything else
_HYPHEN = re.compile(rf"(?<![\w.*-])({_PART})\s+-\s+({_PART})(?![\w.*-])")

Term = tuple[str, Version, int]


class Constraint:
    def __init__(self, text: str) -> None:
        self.text = text
        #: per ``||`` alternative: its terms (all must hold) and whether it names a pre-release
        self._groups: list[tuple[list[Term], bool]] = []
        for alt in text.split("||"):
            alt = alt.strip()
            if not alt:
                raise InvalidInput(f"invalid semver constraint {text!r}")
            alt = _HYPHEN.sub(r">=\1 <=\2", alt)
            alt = re.sub(r"(!=|>=|<=|=>|=<|~>|>|<|=|~|\^)\s+", r"\1", alt)
            terms: list[Term] = []
            for raw in re.split(r"[,\s]+", alt):
                raw = raw.strip()
                if not raw:
                    continue
                m = _TERM.match(raw)
                if not m:
                    raise InvalidInput(f"invalid semver constraint {text!r}: cannot read {raw!r}")
                terms.extend(self._expand(m.group("op") or "=", m.group("ver")))
            # as in Masterminds, a pre-release only matches when the constraint names one (here: this alternative)
            names_pre = "-" in alt
            self._groups.append((terms, names_pre))

    @staticmethod
    def _expand(op: str, ver: str) -> list[Term]:
        v, given = _bound(ver)
        op = {"=>": ">=", "=<": "<=", "~>": "~"}.get(op, op)
        if op == "~":
            return [(">=", v, 3), ("<", _next(v, 2 if given >= 2 else 1), 3)]
        if op == "^":
            if v.major > 0 or given == 1:
                upper = Version(v.major + 1, 0, 0)
            elif v.minor > 0 or given == 2:
                upper = Version(0, v.minor + 1, 0)
            else:
                upper = Version(0, 0, v.patch + 1)
            return [(">=", v, 3), ("<", upper, 3)]
        if op == "=" and given < 3:
            return [(">=", v, 3), ("<", _next(v, given), 3)] if given else []
        if op == "!=" and given < 3:
            # != 1.2 excludes all of 1.2.x: kept as a range, tested in check()
            return [("!~", v, given)]
        if op == ">" and given < 3:
            return [(">=", _next(v, given), 3)]
        if op == "<=" and given < 3:
            return [("<", _next(v, given), 3)]
        return [(op, v, given)]

    def check(self, version: Version) -> bool:
        ops: dict[str, Callable[[Version, Version, int], bool]] = {
            "=": lambda a, b, g: a._key() == b._key(),
            "!=": lambda a, b, g: a._key() != b._key(),
            "!~": lambda a, b, g: not (b <= a < _next(b, g)) if g else False,
            ">": lambda a, b, g: a > b,
            ">=": lambda a, b, g: a >= b,
            "<": lambda a, b, g: a < b,
            "<=": lambda a, b, g: a <= b,
        }
        return any(
            (names_pre or not version.pre) and all(ops[op](version, bound, given) for op, bound, given in terms)
            for terms, names_pre in self._groups
        )


def matches(constraint: str, tag: str) -> bool:
    v = Version.parse(tag)
    return v is not None and Constraint(constraint).check(v)
