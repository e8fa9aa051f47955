"""The one boundary where documents from outside become typed values.

Manifests, indexes, image configs, tag lists, catalog pages, referrers lists and token answers come from
servers (or files) Ferry does not control. Each is read here: ``load_json`` turns bytes into JSON values
(refusing invalid JSON, ``NaN``/``Infinity`` and nesting deeper than ``MAX_DEPTH``), and :class:`Fields`
reads one JSON object field by field with the type each field must have. Every wrong shape raises
``MalformedDocument`` with one line that names the document and the field (``layers[2]: expected an
object, got null``), never a ``KeyError``, ``AttributeError``, ``OverflowError`` or ``RecursionError``.

Code above this module indexes only into values that went through it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from ._errors import FerryError, MalformedDocument

T = TypeVar("T")

#: JSON nested deeper than this is refused (real documents nest fewer than 10 levels)
MAX_DEPTH = 64
#: sizes are int64 in the specs
MAX_SIZE = (1 << 63) - 1


def kind(value: object) -> str:
    """The JSON name of a value's type, for messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _depth_ok(value: object) -> bool:
    stack: list[tuple[object, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > MAX_DEPTH:
            return False
        if isinstance(item, dict):
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item)
    return True


def load_json(raw: bytes | str, what: str) -> Any:
    """Parse ``raw`` as JSON; ``what`` names the document in the error (``manifest``, ``tag list of HOST/REPO``)."""
    try:
        value = json.loads(raw, parse_constant=_no_constant)
    except RecursionError:
        raise MalformedDocument(f"malformed {what}: JSON nested too deeply") from None
    except ValueError as exc:  # UnicodeDecodeError and JSONDecodeError included
        raise MalformedDocument(f"malformed {what}: not valid JSON ({exc})") from None
    if not _depth_ok(value):
        raise MalformedDocument(f"malformed {what}: JSON nested deeper than {MAX_DEPTH} levels")
    return value


def load_object(raw: bytes | str, what: str) -> Fields:
    """Parse ``raw`` as a JSON object and return its :class:`Fields`."""
    return Fields(load_json(raw, what), what)


class Fields:
    """Typed, checked access to one JSON object of a document.

    ``what`` names the document, ``path`` the object inside it (``layers[1].platform``); both go into
    every error. Getters return the default for an absent key or ``null``, and raise ``MalformedDocument``
    for a value of another type.
    """

    __slots__ = ("obj", "path", "what")

    def __init__(self, obj: object, what: str, path: str = "") -> None:
        if not isinstance(obj, dict):
            where = f"{path}: " if path else ""
            raise MalformedDocument(f"malformed {what}: {where}expected an object, got {kind(obj)}")
        self.obj: dict[str, Any] = obj
        self.what = what
        self.path = path

    def _name(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def fail(self, key: str, expected: str, value: object) -> MalformedDocument:
        return MalformedDocument(f"malformed {self.what}: {self._name(key)}: expected {expected}, got {kind(value)}")

    def has(self, key: str) -> bool:
        return self.obj.get(key) is not None

    def _get(self, key: str, required: bool) -> Any:
        value = self.obj.get(key)
        if value is None and required:
            raise MalformedDocument(f"malformed {self.what}: {self._name(key)} is missing")
        return value

    def text(self, key: str, default: str = "", *, required: bool = False) -> str:
        value = self._get(key, required)
        if value is None:
            return default
        if not isinstance(value, str):
            raise self.fail(key, "a string", value)
        return value

    def whole(self, key: str, default: int = 0, *, required: bool = False, maximum: int = MAX_SIZE) -> int:
        """A whole number in ``0..maximum`` (sizes, counts); ``5.0``, ``1e400`` and ``true`` are refused."""
        value = self._get(key, required)
        if value is None:
            return default
        if not isinstance(value, int) or isinstance(value, bool):
            raise self.fail(key, "a whole number", value)
        if not 0 <= value <= maximum:
            raise MalformedDocument(f"malformed {self.what}: {self._name(key)}: {value} is out of range")
        return value

    def number(self, key: str, default: float) -> float:
        """A finite number >= 0 (``expires_in``)."""
        value = self._get(key, False)
        if value is None:
            return default
        if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value) or value < 0:
            raise self.fail(key, "a finite number >= 0", value)
        return float(value)

    def flag(self, key: str, default: bool = False) -> bool:
        value = self._get(key, False)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise self.fail(key, "true or false", value)
        return value

    def child(self, key: str, *, required: bool = False) -> Fields | None:
        value = self._get(key, required)
        if value is None:
            return None
        return Fields(value, self.what, self._name(key))

    def array(self, key: str, *, required: bool = False) -> list[Any]:
        value = self._get(key, required)
        if value is None:
            return []
        if not isinstance(value, list):
            raise self.fail(key, "a list", value)
        return value

    def objects(self, key: str, *, required: bool = False) -> list[Fields]:
        """A list of objects (``layers``, ``manifests``); a ``null`` entry is an error."""
        return [
            Fields(v, self.what, f"{self._name(key)}[{i}]") for i, v in enumerate(self.array(key, required=required))
        ]

    def texts(self, key: str) -> list[str]:
        values = self.array(key)
        for i, v in enumerate(values):
            if not isinstance(v, str):
                raise self.fail(f"{key}[{i}]", "a string", v)
        return values

    def text_map(self, key: str) -> dict[str, str]:
        """An object of strings (``annotations``, ``Labels``)."""
        value = self._get(key, False)
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise self.fail(key, "an object of strings", value)
        for k, v in value.items():
            if not isinstance(v, str):
                raise self.fail(f"{key}.{k}", "a string", v)
        return value

    def parse(self, key: str, parser: Callable[[str], T], *, required: bool = False) -> T | None:
        """A string field turned into a value by ``parser`` (``Digest.parse``); its errors name the field."""
        text = self.text(key, required=required)
        if not text and not required:
            return None
        try:
            return parser(text)
        except FerryError as exc:
            raise MalformedDocument(f"malformed {self.what}: {self._name(key)}: {exc}") from None


# -- small documents ---------------------------------------------------------------------------------------------


def parse_name_page(raw: bytes, key: str, what: str) -> list[str]:
    """One page of a tag list (``key="tags"``) or a catalog (``key="repositories"``)."""
    return load_object(raw, what).texts(key)


@dataclass(frozen=True)
class TokenAnswer:
    """A Bearer token service's answer (Docker token spec / OAuth2)."""

    token: str
    refresh_token: str
    #: seconds, ``None`` when the service did not say
    expires_in: float | None


def parse_token_answer(raw: bytes, what: str) -> TokenAnswer:
    f = load_object(raw, what)
    token = f.text("token") or f.text("access_token")
    if not token:
        raise MalformedDocument(f"malformed {what}: no token in the answer")
    expires = f.number("expires_in", -1.0)
    return TokenAnswer(token, f.text("refresh_token"), expires if expires > 0 else None)


def check_config(raw: bytes, what: str = "image config") -> dict[str, Any]:
    """An image config (OCI or Docker): the fields Ferry reads have the types the specs give them."""
    f = load_object(raw, what)
    for key in ("created", "author", "architecture", "os", "variant", "os.version", "docker_version"):
        f.text(key)
    f.texts("os.features")
    inner = f.child("config")
    if inner is not None:
        inner.text_map("Labels")
        inner.texts("Env")
        for key in ("User", "WorkingDir", "StopSignal"):
            inner.text(key)
    rootfs = f.child("rootfs")
    if rootfs is not None:
        rootfs.text("type")
        rootfs.texts("diff_ids")
    for entry in f.objects("history"):
        for key in ("created", "created_by", "author", "comment"):
            entry.text(key)
        entry.flag("empty_layer")
    return f.obj
