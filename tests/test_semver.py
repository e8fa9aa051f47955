"""``images-by-semver`` constraints (worker/engine/semver.py): the Masterminds/semver syntax skopeo uses.

Comparison operators, ``,``/space for AND and ``||`` for OR, ``~`` and ``^`` ranges, ``x``/``X``/``*`` wildcards
and partial versions, hyphen ranges, and pre-releases, which only match a constraint that names a pre-release.
"""

from __future__ import annotations

import pytest

from worker.engine.semver import Constraint, Version, matches
from worker.registry import InvalidInput

TAGS = [
    "0.0.3", "0.0.4", "0.1.0", "0.2.3", "0.2.9", "0.3.0", "0.9.0",
    "1.0.0", "1.0.1", "1.2.0", "1.2.3", "1.2.9", "1.3.0", "1.5.0-rc.1", "1.9.9",
    "2.0.0-alpha", "2.0.0-beta.2", "2.0.0", "2.1.0", "3.0.0", "10.0.0",
]  # fmt: skip
#: the releases of TAGS with major version 1
ONES = ["1.0.0", "1.0.1", "1.2.0", "1.2.3", "1.2.9", "1.3.0", "1.9.9"]


def selected(constraint: str, tags: list[str] = TAGS) -> list[str]:
    return [t for t in tags if matches(constraint, t)]


# --------------------------------------------------------------------------------------------------------------------
# versions


@pytest.mark.parametrize(
    ("tag", "expected"),
    [
        ("1.2.3", Version(1, 2, 3)),
        ("v1.2.3", Version(1, 2, 3)),  # Masterminds' NewVersion takes a leading v ...
        ("1.2", Version(1, 2, 0)),  # ... and partial versions
        ("v2", Version(2, 0, 0)),
        ("1.2.3-rc.1", Version(1, 2, 3, ("rc", "1"))),
        ("1.2.3+build.7", Version(1, 2, 3)),  # build metadata does not count
        ("1.2.3-beta+exp.sha.5114f85", Version(1, 2, 3, ("beta",))),
    ],
)
def test_version_parse(tag: str, expected: Version) -> None:
    assert Version.parse(tag) == expected


@pytest.mark.parametrize("tag", ["latest", "stable", "1.2.3.4", "1.2.x", "v", "1.", "01.2.3", "1.2.3-", "sha256-abc"])
def test_non_versions_are_not_parsed(tag: str) -> None:
    assert Version.parse(tag) is None


def test_ordering_follows_semver_precedence() -> None:
    ordered = ["1.0.0-alpha", "1.0.0-alpha.1", "1.0.0-alpha.beta", "1.0.0-beta", "1.0.0-beta.2", "1.0.0-beta.11",
               "1.0.0-rc.1", "1.0.0", "1.0.1", "1.1.0", "1.10.0", "2.0.0"]  # fmt: skip
    versions = [Version.parse(t) for t in ordered]
    assert all(v is not None for v in versions)
    shuffled = list(reversed(versions))
    assert sorted(shuffled) == versions  # type: ignore[type-var]
    assert Version(1, 0, 0, ("beta", "2")) < Version(1, 0, 0, ("beta", "11"))  # numeric, not lexical


# --------------------------------------------------------------------------------------------------------------------
# constraints


@pytest.mark.parametrize(
    ("constraint", "expected"),
    [
        # comparisons; a space or a comma between terms is AND
        (">=1.0.0 <2", ONES),
        (">= 1.2.3, < 1.3", ["1.2.3", "1.2.9"]),
        (">1.2.3 <=1.3.0", ["1.2.9", "1.3.0"]),
        ("=1.2.3", ["1.2.3"]),
        ("1.2.3", ["1.2.3"]),
        ("<0.1", ["0.0.3", "0.0.4"]),
        ("!=1.2.3 >=1.2 <1.3", ["1.2.0", "1.2.9"]),
        # partial versions: =1.2 is 1.2.x, >1.2 is >=1.3.0, <=1.2 is <1.3.0
        ("1.2", ["1.2.0", "1.2.3", "1.2.9"]),
        (">1.2 <2", ["1.3.0", "1.9.9"]),
        (">=1.2 <=1.3", ["1.2.0", "1.2.3", "1.2.9", "1.3.0"]),
        ("<=0.2", ["0.0.3", "0.0.4", "0.1.0", "0.2.3", "0.2.9"]),
        (">2", ["3.0.0", "10.0.0"]),
        ("!=1.2", [t for t in TAGS if "-" not in t and not t.startswith("1.2.")]),
        # wildcards
        ("1.2.x", ["1.2.0", "1.2.3", "1.2.9"]),
        ("1.*", ONES),
        ("2.X", ["2.0.0", "2.1.0"]),
        (">= 2.x", ["2.0.0", "2.1.0", "3.0.0", "10.0.0"]),
        ("<= 0.x", ["0.0.3", "0.0.4", "0.1.0", "0.2.3", "0.2.9", "0.3.0", "0.9.0"]),
        # tilde: patch-level changes (minor-level when only the major is given)
        ("~1.2.3", ["1.2.3", "1.2.9"]),
        ("~1.2", ["1.2.0", "1.2.3", "1.2.9"]),
        ("~1", ONES),
        ("~>0.2", ["0.2.3", "0.2.9"]),
        # caret: compatible changes; below 1.0.0 the minor (then the patch) is the breaking part
        ("^1.2.3", ["1.2.3", "1.2.9", "1.3.0", "1.9.9"]),
        ("^1.2.x", ["1.2.0", "1.2.3", "1.2.9", "1.3.0", "1.9.9"]),
        ("^0.2.3", ["0.2.3", "0.2.9"]),
        ("^0.2", ["0.2.3", "0.2.9"]),
        ("^0.0.3", ["0.0.3"]),
        ("^0.0", ["0.0.3", "0.0.4"]),
        ("^0", ["0.0.3", "0.0.4", "0.1.0", "0.2.3", "0.2.9", "0.3.0", "0.9.0"]),
        # OR
        ("^0.2 || >=3", ["0.2.3", "0.2.9", "3.0.0", "10.0.0"]),
        ("1.0.0||2.1.0 || 10", ["1.0.0", "2.1.0", "10.0.0"]),
        # hyphen ranges: inclusive; a partial upper end covers the whole of it
        ("1.2.3 - 1.3.0", ["1.2.3", "1.2.9", "1.3.0"]),
        ("1.2 - 1.3", ["1.2.0", "1.2.3", "1.2.9", "1.3.0"]),
        ("0.2.3 - 1", ["0.2.3", "0.2.9", "0.3.0", "0.9.0", *ONES]),
        ("1 - 1.2, !=1.0.1", ["1.0.0", "1.2.0", "1.2.3", "1.2.9"]),
        ("0.0.3 - 0.0.4 || 3 - 10", ["0.0.3", "0.0.4", "3.0.0", "10.0.0"]),
        # numeric, not lexical: 10.0.0 > 2.x
        (">2.1.0", ["3.0.0", "10.0.0"]),
        ("*", [t for t in TAGS if "-" not in t]),
    ],
)
def test_constraint_selects(constraint: str, expected: list[str]) -> None:
    assert selected(constraint) == expected


@pytest.mark.parametrize(
    ("constraint", "expected"),
    [
        # pre-releases are left out unless the constraint names one ...
        (">=1.0.0 <3", ["1.0.0", "1.0.1", "1.2.0", "1.2.3", "1.2.9", "1.3.0", "1.9.9", "2.0.0", "2.1.0"]),
        ("1.0 - 2.0", ["1.0.0", "1.0.1", "1.2.0", "1.2.3", "1.2.9", "1.3.0", "1.9.9", "2.0.0"]),  # no "-" in there
        ("^1.2", ["1.2.0", "1.2.3", "1.2.9", "1.3.0", "1.9.9"]),
        ("~1.5.0", []),
        # ... and then they compare in semver order
        (">=2.0.0-alpha <2.0.0", ["2.0.0-alpha", "2.0.0-beta.2"]),
        (">2.0.0-alpha <=2.0.0", ["2.0.0-beta.2", "2.0.0"]),
        ("~1.5.0-0", ["1.5.0-rc.1"]),
        ("1.5.0-rc.1", ["1.5.0-rc.1"]),
        ("2.0.0-alpha - 2.0.0", ["2.0.0-alpha", "2.0.0-beta.2", "2.0.0"]),
        # an alternative that names no pre-release does not take them in because another one does
        ("1.x || =2.0.0-alpha", ["1.0.0", "1.0.1", "1.2.0", "1.2.3", "1.2.9", "1.3.0", "1.9.9", "2.0.0-alpha"]),
    ],
)
def test_pre_releases_only_when_named(constraint: str, expected: list[str]) -> None:
    assert selected(constraint) == expected


def test_tags_with_a_v_prefix_and_partial_tags() -> None:
    tags = ["v1.0.0", "v1.4", "v2", "2.0.1", "latest", "v1.4.0-rc1", "nightly-2024"]
    assert selected(">=1.4 <3", tags) == ["v1.4", "v2", "2.0.1"]
    assert selected("v1.x", tags) == ["v1.0.0", "v1.4"]


def test_constraint_object_is_reusable() -> None:
    c = Constraint(">= 1.2, < 2 || ^3")
    v = Version.parse
    assert [c.check(v(t)) for t in ("1.1.9", "1.2.0", "1.99.0", "2.0.0", "3.4.5", "4.0.0")] == [  # type: ignore[arg-type]
        False, True, True, False, True, False,
    ]  # fmt: skip


@pytest.mark.parametrize("constraint", ["", "||", ">=", "abc", ">=1.2.3.4", "1.2 ||", "=> >=1", "~>", "1.2.3 -"])
def test_invalid_constraints_are_refused(constraint: str) -> None:
    with pytest.raises(InvalidInput):
        Constraint(constraint)
