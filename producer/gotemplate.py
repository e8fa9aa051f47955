"""Go ``text/template`` for ``inspect --format``, evaluated as skopeo evaluates its inspect struct.

What is accepted behaves as Go's ``text/template`` does (a table of templates and Go's outputs is in
tests/test_gotemplate.py); anything else is one clear template error, never an internal one:

* actions: fields (``.A.B``, ``$x.A``, ``(pipeline).A``), pipelines split on ``|`` outside quotes and
  parentheses, literals (strings ``"…"``/```…```, runes ``'a'``, numbers, ``true``/``false``/``nil``),
  variables (``$x := …``, ``$x = …``, scoped to their block), comments ``{{/* … */}}``, trim markers
  ``{{- `` and `` -}}``;
* blocks: ``if``/``else if``/``else``, ``range`` (lists, maps in key order, an integer; ``$i, $e :=``;
  ``else``; ``break``/``continue``), ``with``/``else with``/``else``;
* Go's functions ``and or not eq ne lt le gt ge len index slice print printf println html js urlquery``
  (``printf`` with Go's verbs and flags) and skopeo's (containers/common ``report``) ``json join split
  lower upper title pad truncate``.

``define``/``template``/``block`` and ``call`` are refused.
"""

from __future__ import annotations

import json
import math
import re
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from worker.registry import InvalidInput


class GoStruct(dict[str, Any]):
    """A dict standing for a Go struct: a field it lacks is a template error, not ``<no value>`` (that is maps)."""


class GoTime(str):
    """An RFC 3339 timestamp that a template prints the way Go prints a ``time.Time``."""

    def __str__(self) -> str:
        return go_time_string(str.__str__(self))


class TemplateError(InvalidInput):
    def __init__(self, message: str) -> None:
        super().__init__(f"invalid --format template: {message}")


class _NoValue:
    """A map's missing key: prints ``<no value>``, is false."""

    def __repr__(self) -> str:
        return "<no value>"


NO_VALUE = _NoValue()


def go_time_string(text: str) -> str:
    """``2024-01-02T03:04:05.5Z`` -> ``2024-01-02 03:04:05.5 +0000 UTC`` (Go's ``Time.String``)."""
    m = re.fullmatch(r"(\d{4}-\d{2}-\d{2})[Tt](\d{2}:\d{2}:\d{2})(?:\.(\d+))?([Zz]|[+-]\d{2}:\d{2})", text)
    if m is None:
        return text
    out = f"{m[1]} {m[2]}"
    frac = (m[3] or "")[:9].rstrip("0")
    if frac:
        out += "." + frac
    zone = m[4]
    if zone in ("Z", "z") or zone[1:] == "00:00":
        return out + " +0000 UTC"
    offset = zone.replace(":", "")
    return f"{out} {offset} {offset}"


def _float_str(value: float) -> str:
    """Go's ``%v`` of a float64 (``strconv.FormatFloat(f, 'g', -1, 64)`` with Go's exponent form)."""
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if math.isnan(value):
        return "NaN"
    text = repr(value)
    if "e" in text or "E" in text:
        mant, _, exp = text.partition("e")
        mant = mant[:-2] if mant.endswith(".0") else mant
        sign = "-" if exp.startswith("-") else "+"
        return f"{mant}e{sign}{exp.lstrip('+-').zfill(2)}"
    exp10 = math.floor(math.log10(abs(value))) if value else 0
    if exp10 >= 21:
        return _float_str(float(f"{value:e}"))
    return text[:-2] if text.endswith(".0") else text


def go_str(value: Any) -> str:
    """``fmt.Sprint`` of one value."""
    if value is NO_VALUE:
        return "<no value>"
    if value is None:
        return "<nil>"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return _float_str(value)
    if isinstance(value, GoStruct):
        return "{" + " ".join(go_str(v) for v in value.values()) + "}"
    if isinstance(value, list | tuple):
        return "[" + " ".join(go_str(v) for v in value) + "]"
    if isinstance(value, dict):
        return "map[" + " ".join(f"{go_str(k)}:{go_str(v)}" for k, v in sorted(value.items())) + "]"
    return str(value)


def _truth(value: Any) -> bool:
    if value is NO_VALUE or value is None:
        return False
    if isinstance(value, GoStruct):
        return True
    if isinstance(value, bool | int | float | str | list | tuple | dict):
        return bool(value)
    return True


def _type_name(value: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "float64"
    if isinstance(value, str):
        return "string"
    if isinstance(value, GoStruct):
        return "struct"
    if isinstance(value, list | tuple):
        return "[]interface {}"
    if isinstance(value, dict):
        return "map[string]interface {}"
    return "<nil>"


# ---------------------------------------------------------------------------------------------------- lexing


_TOKEN = re.compile(
    r"""
    (?P<space>\s+)
  | (?P<decl>:=)
  | (?P<assign>=)
  | (?P<pipe>\|)
  | (?P<lparen>\()
  | (?P<rparen>\))
  | (?P<comma>,)
  | (?P<string>"(?:[^"\\\n]|\\.)*")
  | (?P<raw>`[^`]*`)
  | (?P<char>'(?:[^'\\\n]|\\.)+')
  | (?P<number>[+-]?(?:0[xX][0-9a-fA-F_]+|0[bB][01_]+|0[oO][0-7_]+|(?:\d[\d_]*\.?[\d_]*|\.\d[\d_]*)(?:[eE][+-]?\d+)?))
  | (?P<field>(?:\.[A-Za-z_][A-Za-z0-9_]*)+)
  | (?P<dot>\.)
  | (?P<variable>\$[A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*)
  | (?P<ident>[A-Za-z_][A-Za-z0-9_]*)
    """,
    re.X,
)


@dataclass
class _Tok:
    kind: str
    text: str
    #: whitespace before it: ``(x).A`` chains a field, ``(x) .A`` is a second argument
    spaced: bool = False


def _lex(action: str) -> list[_Tok]:
    out: list[_Tok] = []
    pos = 0
    spaced = False
    while pos < len(action):
        m = _TOKEN.match(action, pos)
        if m is None:
            raise TemplateError(f"unexpected {action[pos]!r} in {{{{{action}}}}}")
        kind = m.lastgroup or ""
        text = m.group()
        pos = m.end()
        if kind == "space":
            spaced = True
            continue
        out.append(_Tok(kind, text, spaced))
        spaced = False
    return out


def _unquote(tok: _Tok) -> Any:
    if tok.kind == "raw":
        return tok.text[1:-1]
    if tok.kind == "string":
        try:
            value = json.loads(_go_escapes(tok.text), strict=False)
        except ValueError:
            raise TemplateError(f"bad string literal {tok.text}") from None
        return str(value)
    if tok.kind == "char":
        body = tok.text[1:-1]
        text = json.loads(_go_escapes('"' + body.replace('"', '\\"') + '"')) if body != "\\'" else "'"
        if len(text) != 1:
            raise TemplateError(f"bad character literal {tok.text}")
        return ord(text)
    raise AssertionError(tok.kind)


def _go_escapes(text: str) -> str:
    """Go string escapes that JSON lacks (``\\a \\v \\x41 \\101 \\U0001F600 \\'``) as JSON ones."""

    def sub(m: re.Match[str]) -> str:
        esc = m.group(1)
        if esc in "a":
            return "\\u0007"
        if esc == "v":
            return "\\u000b"
        if esc == "'":
            return "'"
        if esc.startswith("x"):
            return f"\\u00{esc[1:]}"
        if esc.startswith("U"):
            return json.dumps(chr(int(esc[1:], 16)))[1:-1]
        if esc[0] in "01234567":
            return f"\\u{int(esc, 8):04x}"
        return "\\" + esc

    return re.sub(r"\\(x[0-9a-fA-F]{2}|U[0-9a-fA-F]{8}|[0-7]{3}|[av']|[^xU0-7av'])", sub, text)


def _number(text: str) -> int | float:
    clean = text.replace("_", "")
    try:
        return int(clean, 0)
    except ValueError:
        pass
    try:
        return float(clean)
    except ValueError:
        raise TemplateError(f"bad number syntax: {text!r}") from None


# ---------------------------------------------------------------------------------------------------- parsing


@dataclass
class _Term:
    kind: str  # literal | field | variable | dot | ident | pipe
    value: Any = None
    chain: tuple[str, ...] = ()  # field names accessed after the term


@dataclass
class _Pipeline:
    decl: list[str] = field(default_factory=list)
    assign: bool = False
    commands: list[list[_Term]] = field(default_factory=list)


@dataclass
class _Text:
    text: str


@dataclass
class _Action:
    pipe: _Pipeline


@dataclass
class _Block:
    kind: str  # if | range | with
    pipe: _Pipeline
    body: list[Any] = field(default_factory=list)
    else_body: list[Any] = field(default_factory=list)


@dataclass
class _Jump:
    kind: str  # break | continue


class _PipeParser:
    def __init__(self, toks: list[_Tok], source: str) -> None:
        self.toks = toks
        self.pos = 0
        self.source = source

    def peek(self) -> _Tok | None:
        return self.toks[self.pos] if self.pos < len(self.toks) else None

    def next(self) -> _Tok:
        tok = self.peek()
        if tok is None:
            raise TemplateError(f"unexpected end of {{{{{self.source}}}}}")
        self.pos += 1
        return tok

    def pipeline(self, *, allow_decl: bool = True, range_decl: bool = False) -> _Pipeline:
        pipe = _Pipeline()
        if allow_decl:
            save = self.pos
            names: list[str] = []
            while (tok := self.peek()) is not None and tok.kind == "variable" and "." not in tok.text:
                names.append(self.next().text)
                sep = self.peek()
                if sep is not None and sep.kind == "comma" and range_decl and len(names) == 1:
                    self.next()
                    continue
                break
            sep = self.peek()
            if names and sep is not None and sep.kind in ("decl", "assign"):
                self.next()
                pipe.decl = names
                pipe.assign = sep.kind == "assign"
                if len(names) > 1 and not range_decl:
                    raise TemplateError("too many declarations")
            else:
                self.pos = save
        while True:
            pipe.commands.append(self.command())
            tok = self.peek()
            if tok is None or tok.kind == "rparen":
                break
            if tok.kind != "pipe":
                raise TemplateError(f"unexpected {tok.text!r} in {{{{{self.source}}}}}")
            self.next()
        return pipe

    def command(self) -> list[_Term]:
        terms: list[_Term] = []
        while (tok := self.peek()) is not None and tok.kind not in ("pipe", "rparen"):
            terms.append(self.operand())
        if not terms:
            raise TemplateError(f"missing value for command in {{{{{self.source}}}}}")
        return terms

    def operand(self) -> _Term:
        tok = self.next()
        term: _Term
        if tok.kind in ("string", "raw", "char"):
            term = _Term("literal", _unquote(tok))
        elif tok.kind == "number":
            term = _Term("literal", _number(tok.text))
        elif tok.kind == "field":
            term = _Term("dot", chain=tuple(tok.text[1:].split(".")))
        elif tok.kind == "dot":
            term = _Term("dot")
        elif tok.kind == "variable":
            name, *chain = tok.text.split(".")
            term = _Term("variable", name, tuple(chain))
        elif tok.kind == "ident":
            if tok.text in ("true", "false"):
                term = _Term("literal", tok.text == "true")
            elif tok.text == "nil":
                term = _Term("literal", None)
            else:
                term = _Term("ident", tok.text)
        elif tok.kind == "lparen":
            inner = self.pipeline()
            close = self.next()
            if close.kind != "rparen":
                raise TemplateError(f"unclosed left paren in {{{{{self.source}}}}}")
            term = _Term("pipe", inner)
        else:
            raise TemplateError(f"unexpected {tok.text!r} in {{{{{self.source}}}}}")
        follow = self.peek()
        if follow is not None and follow.kind == "field" and not follow.spaced and term.kind != "ident":
            if term.kind == "literal" or (term.kind == "dot" and term.chain == ()):
                return term
            self.next()
            term.chain = (*term.chain, *follow.text[1:].split("."))
        return term


_ACTION = re.compile(r"{{(-\s)?(.*?)(\s-)?}}", re.S)


def parse(template: str) -> list[Any]:
    """The template as a tree; a syntax error is a ``TemplateError``."""
    root: list[Any] = []
    stack: list[tuple[_Block, bool]] = []  # (block, in_else)
    chained: list[int] = []  # for each open block: how many implicit blocks "else if/with" opened

    def current() -> list[Any]:
        if not stack:
            return root
        block, in_else = stack[-1]
        return block.else_body if in_else else block.body

    pieces: list[tuple[str, str]] = []  # ("text", t) | ("action", a)
    pos = 0
    for m in _ACTION.finditer(template):
        text = template[pos : m.start()]
        if m.group(1):
            text = text.rstrip(" \t\r\n")
        if pieces and pieces[-1][0] == "trim-next":
            pieces.pop()
            text = text.lstrip(" \t\r\n")
        pieces.append(("text", text))
        pieces.append(("action", m.group(2)))
        if m.group(3):
            pieces.append(("trim-next", ""))
        pos = m.end()
    tail = template[pos:]
    if pieces and pieces[-1][0] == "trim-next":
        pieces.pop()
        tail = tail.lstrip(" \t\r\n")
    if "{{" in tail:
        raise TemplateError("unclosed action")
    pieces.append(("text", tail))

    loops = 0
    for kind, text in pieces:
        if kind == "text":
            if text:
                current().append(_Text(text))
            continue
        action = text.strip()
        if action.startswith("/*"):
            if not action.endswith("*/"):
                raise TemplateError("unclosed comment")
            continue
        toks = _lex(action)
        if not toks:
            raise TemplateError("missing value for command")
        word = toks[0].text if toks[0].kind == "ident" else ""
        if word in ("if", "range", "with"):
            p = _PipeParser(toks[1:], action)
            pipe = p.pipeline(range_decl=word == "range")
            block = _Block(word, pipe)
            current().append(block)
            stack.append((block, False))
            chained.append(0)
            if word == "range":
                loops += 1
        elif word == "else":
            if not stack or stack[-1][1]:
                raise TemplateError("unexpected {{else}}")
            block, _ = stack[-1]
            stack[-1] = (block, True)
            if len(toks) > 1:
                sub = toks[1].text if toks[1].kind == "ident" else ""
                if sub not in ("if", "with") or block.kind == "range":
                    raise TemplateError(f"unexpected {{{{{action}}}}}")
                inner = _Block(sub, _PipeParser(toks[2:], action).pipeline())
                current().append(inner)
                stack.append((inner, False))
                chained[-1] += 1
        elif word == "end":
            if len(toks) > 1:
                raise TemplateError("unexpected words after {{end}}")
            if not stack:
                raise TemplateError("unexpected {{end}}")
            for _ in range(chained.pop()):
                stack.pop()
            block, _ = stack.pop()
            if block.kind == "range":
                loops -= 1
        elif word in ("break", "continue"):
            if loops == 0:
                raise TemplateError(f"{{{{{word}}}}} outside {{{{range}}}}")
            current().append(_Jump(word))
        elif word in ("define", "template", "block"):
            raise TemplateError(f"{{{{{word}}}}} is not supported")
        else:
            current().append(_Action(_PipeParser(toks, action).pipeline()))
    if stack:
        raise TemplateError(f"unexpected EOF: unclosed {{{{{stack[-1][0].kind}}}}}")
    return root


# ---------------------------------------------------------------------------------------------------- functions


def _need(name: str, args: list[Any], n: int) -> None:
    if len(args) != n:
        raise TemplateError(f"wrong number of args for {name}: want {n} got {len(args)}")


def _basic(value: Any) -> Any:
    if isinstance(value, GoTime):
        return str.__str__(value)
    return value


def _kind(value: Any) -> str:
    value = _basic(value)
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "float"
    if isinstance(value, str):
        return "string"
    if value is None or value is NO_VALUE:
        return "nil"
    return "other"


def _eq(args: list[Any]) -> bool:
    if len(args) < 2:
        raise TemplateError("missing argument for comparison")
    first = _basic(args[0])
    for other in args[1:]:
        other = _basic(other)
        k1, k2 = _kind(first), _kind(other)
        if k1 == "other" or k2 == "other":
            if k1 == k2 == "other" or "nil" in (k1, k2):
                raise TemplateError("invalid type for comparison")
            raise TemplateError("incompatible types for comparison")
        if k1 != k2:
            if "nil" in (k1, k2):
                raise TemplateError("invalid type for comparison")
            raise TemplateError("incompatible types for comparison")
        if first == other:
            return True
    return False


def _lt(a: Any, b: Any) -> bool:
    a, b = _basic(a), _basic(b)
    ka, kb = _kind(a), _kind(b)
    if ka in ("bool", "other", "nil") or kb in ("bool", "other", "nil"):
        raise TemplateError("invalid type for comparison")
    if ka != kb:
        raise TemplateError("incompatible types for comparison")
    return bool(a < b)


def _length(value: Any) -> int:
    if isinstance(value, str | list | tuple | dict) and not isinstance(value, GoStruct):
        return len(value.encode()) if isinstance(value, str) else len(value)
    raise TemplateError(f"len of type {_type_name(value)}")


def _index(value: Any, *keys: Any) -> Any:
    for key in keys:
        if isinstance(value, dict) and not isinstance(value, GoStruct):
            if not isinstance(key, str):
                raise TemplateError(f"value has type {_type_name(key)}; should be string")
            value = value.get(key, "")
        elif isinstance(value, list | tuple | str):
            if not isinstance(key, int) or isinstance(key, bool):
                raise TemplateError(f"cannot index slice/array with type {_type_name(key)}")
            if not 0 <= key < len(value):
                raise TemplateError(f"index out of range: {key}")
            value = value[key] if not isinstance(value, str) else value.encode()[key]
        elif value is None:
            raise TemplateError("index of untyped nil")
        else:
            raise TemplateError(f"can't index item of type {_type_name(value)}")
    return value


def _slice(value: Any, *bounds: Any) -> Any:
    if not isinstance(value, str | list | tuple):
        raise TemplateError(f"can't slice item of type {_type_name(value)}")
    if len(bounds) > 2 + (0 if isinstance(value, str) else 1):
        raise TemplateError("too many slice indexes")
    size = len(value)
    idx = [int(b) for b in bounds]
    lo = idx[0] if idx else 0
    hi = idx[1] if len(idx) > 1 else size
    if not 0 <= lo <= hi <= size:
        raise TemplateError(f"index out of range: {hi if hi > size else lo}")
    return value[lo:hi]


def _sprint(args: list[Any]) -> str:
    out = ""
    for i, a in enumerate(args):
        if i > 0 and not isinstance(a, str) and not isinstance(args[i - 1], str):
            out += " "
        out += go_str(a)
    return out


def _html(text: str) -> str:
    return (
        text.replace("&", "&amp;")
        .replace("'", "&#39;")
        .replace("<", "&lt;")
        .replace(">", "&gt;")
        .replace('"', "&#34;")
        .replace("\x00", "\ufffd")
    )


def _js(text: str) -> str:
    table = {
        "\\": "\\\\",
        "'": "\\'",
        '"': '\\"',
        "<": "\\u003C",
        ">": "\\u003E",
        "&": "\\u0026",
        "=": "\\u003D",
        "\n": "\\u000A",
        "\r": "\\u000D",
        "\t": "\\u0009",
    }
    return "".join(table.get(c, c if c.isprintable() else f"\\u{ord(c):04X}") for c in text)


def _go_json(value: Any) -> str:
    """containers/common's ``json``: ``encoding/json`` without HTML escaping."""
    return json.dumps(_json_value(value), ensure_ascii=False, separators=(",", ":"))


def _json_value(value: Any) -> Any:
    """What ``encoding/json`` sees: struct fields in order, map keys sorted."""
    if value is NO_VALUE:
        return None
    if isinstance(value, GoStruct):
        return {k: _json_value(v) for k, v in value.items()}
    if isinstance(value, dict):
        return {k: _json_value(value[k]) for k in sorted(value)}
    if isinstance(value, list | tuple):
        return [_json_value(v) for v in value]
    return _basic(value)


def _title(text: str) -> str:
    return re.sub(r"(^|[^\w'])(\w)", lambda m: m.group(1) + m.group(2).upper(), text)


def _pad(text: str, prefix: int, suffix: int) -> str:
    return text if text == "" else " " * prefix + text + " " * suffix


def _truncate(text: str, length: int) -> str:
    return text if len(text) < length else text[:length]


def _string_arg(name: str, value: Any) -> str:
    value = _basic(value)
    if not isinstance(value, str):
        raise TemplateError(f"wrong type for value; expected string; got {_type_name(value)} (in {name})")
    return value


def _int_arg(name: str, value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TemplateError(f"wrong type for value; expected int; got {_type_name(value)} (in {name})")
    return value


def _join(items: Any, sep: Any) -> str:
    if not isinstance(items, list | tuple) or isinstance(items, GoStruct):
        raise TemplateError(f"wrong type for value; expected []string; got {_type_name(items)} (in join)")
    return _string_arg("join", sep).join(_string_arg("join", i) for i in items)


def _call_builtin(name: str, args: list[Any]) -> Any:
    simple: dict[str, Callable[..., Any]] = {
        "len": _length,
        "index": _index,
        "slice": _slice,
        "lt": _lt,
        "le": lambda a, b: _lt(a, b) or _eq([a, b]),
        "gt": lambda a, b: not (_lt(a, b) or _eq([a, b])),
        "ge": lambda a, b: not _lt(a, b),
        "not": lambda a: not _truth(a),
        "json": _go_json,
        "join": _join,
        "split": lambda s, sep: (
            _string_arg("split", s).split(_string_arg("split", sep))
            if _string_arg("split", sep)
            else list(_string_arg("split", s))
        ),
        "lower": lambda s: _string_arg("lower", s).lower(),
        "upper": lambda s: _string_arg("upper", s).upper(),
        "title": lambda s: _title(_string_arg("title", s)),
        "pad": lambda s, a, b: _pad(_string_arg("pad", s), _int_arg("pad", a), _int_arg("pad", b)),
        "truncate": lambda s, n: _truncate(_string_arg("truncate", s), _int_arg("truncate", n)),
    }
    arity = {"len": 1, "lt": 2, "le": 2, "gt": 2, "ge": 2, "not": 1, "json": 1, "join": 2, "split": 2}
    arity.update({"lower": 1, "upper": 1, "title": 1, "pad": 3, "truncate": 2})
    if name in arity:
        _need(name, args, arity[name])
    if name in ("index", "slice") and not args:
        raise TemplateError(f"wrong number of args for {name}: want at least 1 got 0")
    if name in simple:
        return simple[name](*args)
    if name == "eq":
        return _eq(args)
    if name == "ne":
        _need("ne", args, 2)
        return not _eq(args)
    if name == "print":
        return _sprint(args)
    if name == "println":
        return " ".join(go_str(a) for a in args) + "\n"
    if name == "printf":
        if not args:
            raise TemplateError("wrong number of args for printf: want at least 1 got 0")
        return go_sprintf(_string_arg("printf", args[0]), args[1:])
    if name == "html":
        return _html(_sprint(args))
    if name == "js":
        return _js(_sprint(args))
    if name == "urlquery":
        return urllib.parse.quote_plus(_sprint(args), safe="")
    if name == "call":
        raise TemplateError("call is not supported")
    raise TemplateError(f'function "{name}" not defined')


# ---------------------------------------------------------------------------------------------------- printf

_VERB = re.compile(r"%([-+# 0]*)(\*|\d+)?(?:\.(\*|\d*))?(.)", re.S)


def go_sprintf(fmt: str, args: list[Any]) -> str:
    """Go's ``fmt.Sprintf`` for the verbs a template uses: ``v s q d x X o b c t f F e E g G T %``."""
    out: list[str] = []
    pos = 0
    argi = 0
    while True:
        nxt = fmt.find("%", pos)
        if nxt < 0:
            out.append(fmt[pos:])
            break
        out.append(fmt[pos:nxt])
        m = _VERB.match(fmt, nxt)
        if m is None:
            out.append("%!(NOVERB)")
            break
        flags, width_s, prec_s, verb = m.groups()
        pos = m.end()
        if verb == "%" and not flags and width_s is None and prec_s is None:
            out.append("%")
            continue
        width: int | None = None
        prec: int | None = None
        if width_s == "*":
            width = args[argi] if argi < len(args) and isinstance(args[argi], int) else None
            argi += 1
        elif width_s:
            width = int(width_s)
        if prec_s == "*":
            prec = args[argi] if argi < len(args) and isinstance(args[argi], int) else None
            argi += 1
        elif prec_s is not None:
            prec = int(prec_s) if prec_s else 0
        if verb == "%":
            out.append("%")
            continue
        if argi >= len(args):
            out.append(f"%!{verb}(MISSING)")
            continue
        arg = args[argi]
        argi += 1
        out.append(_pad_to(_format_one(verb, arg, flags, prec), width, flags, verb))
    if argi < len(args):
        extra = ", ".join(f"{_type_name(a)}={go_str(a)}" for a in args[argi:])
        out.append(f"%!(EXTRA {extra})")
    return "".join(out)


def _pad_to(text: str, width: int | None, flags: str, verb: str) -> str:
    if width is None or len(text) >= width:
        return text
    if "-" in flags:
        return text.ljust(width)
    if "0" in flags and verb in "dxXobeEfFgG" and text[:1] in "+-" and verb not in "sqvc":
        return text[0] + text[1:].rjust(width - 1, "0")
    if "0" in flags and verb in "dxXobeEfFgG":
        return text.rjust(width, "0")
    return text.rjust(width)


def _bad(verb: str, arg: Any) -> str:
    return f"%!{verb}({_type_name(arg)}={go_str(arg)})"


def _format_one(verb: str, arg: Any, flags: str, prec: int | None) -> str:
    is_int = isinstance(arg, int) and not isinstance(arg, bool)
    if verb == "v":
        if "#" in flags and isinstance(arg, str):
            return json.dumps(arg, ensure_ascii=False)
        return go_str(arg)
    if verb == "T":
        return _type_name(arg)
    if verb == "s":
        if isinstance(arg, str):
            return str(arg)[:prec] if prec is not None else str(arg)
        if isinstance(arg, list | tuple | dict) or arg is NO_VALUE:
            return go_str(arg)
        return _bad(verb, arg)
    if verb == "q":
        if isinstance(arg, str):
            if "#" in flags and "`" not in arg:
                return f"`{arg}`"
            return json.dumps(str(arg), ensure_ascii="+" in flags).replace("\\u00", "\\x") if arg else '""'
        if is_int:
            return "'" + chr(arg) + "'"
        if isinstance(arg, list | tuple):
            return "[" + " ".join(_format_one("q", a, flags, prec) for a in arg) + "]"
        return _bad(verb, arg)
    if verb == "t":
        return ("true" if arg else "false") if isinstance(arg, bool) else _bad(verb, arg)
    if verb in "dxXob":
        if is_int:
            base = {"d": "d", "x": "x", "X": "X", "o": "o", "b": "b"}[verb]
            sign = "+" if "+" in flags and arg >= 0 else (" " if " " in flags and arg >= 0 else "")
            body = format(abs(arg), base)
            prefix = (
                ("0x" if verb == "x" else "0X" if verb == "X" else "0" if verb == "o" else "") if "#" in flags else ""
            )
            if prec is not None:
                body = body.rjust(prec, "0")
            return ("-" if arg < 0 else sign) + prefix + body
        if verb in "xX" and isinstance(arg, str):
            text = arg.encode().hex()
            return text.upper() if verb == "X" else text
        if isinstance(arg, list | tuple):
            return "[" + " ".join(_format_one(verb, a, flags, prec) for a in arg) + "]"
        return _bad(verb, arg)
    if verb == "c":
        return chr(arg) if is_int else _bad(verb, arg)
    if verb == "U":
        return f"U+{arg:04X}" if is_int else _bad(verb, arg)
    if verb in "eEfFgG":
        if isinstance(arg, int | float) and not isinstance(arg, bool):
            value = float(arg)
            if verb in "gG" and prec is None:
                text = _float_str(value)
                return text.upper() if verb == "G" else text
            p = 6 if prec is None else prec
            text = format(value, f"{'+' if '+' in flags else ''}.{p}{verb.lower() if verb == 'F' else verb}")
            return re.sub(r"e([+-])(\d)$", r"e\g<1>0\2", text).replace("E+", "E+").replace("inf", "+Inf")
        return _bad(verb, arg)
    return f"%!{verb}({_type_name(arg)}={go_str(arg)})"


# ---------------------------------------------------------------------------------------------------- executing


class _Break(Exception):
    pass


class _Continue(Exception):
    pass


class _Scope:
    def __init__(self, root: Any) -> None:
        self.vars: list[tuple[str, Any]] = [("$", root)]

    def mark(self) -> int:
        return len(self.vars)

    def pop_to(self, mark: int) -> None:
        del self.vars[mark:]

    def get(self, name: str) -> Any:
        for n, v in reversed(self.vars):
            if n == name:
                return v
        raise TemplateError(f"undefined variable: {name}")

    def declare(self, name: str, value: Any) -> None:
        self.vars.append((name, value))

    def assign(self, name: str, value: Any) -> None:
        for i in range(len(self.vars) - 1, -1, -1):
            if self.vars[i][0] == name:
                self.vars[i] = (name, value)
                return
        raise TemplateError(f"undefined variable: {name}")


def _field(value: Any, name: str) -> Any:
    if isinstance(value, GoStruct):
        if name not in value:
            raise TemplateError(f"can't evaluate field {name} in type struct")
        return value[name]
    if isinstance(value, dict):
        return value.get(name, NO_VALUE)
    if value is None or value is NO_VALUE:
        raise TemplateError(f"nil pointer evaluating interface {{}}.{name}")
    raise TemplateError(f"can't evaluate field {name} in type {_type_name(value)}")


class _Exec:
    def __init__(self, root: Any) -> None:
        self.scope = _Scope(root)

    def chain(self, value: Any, names: tuple[str, ...]) -> Any:
        for name in names:
            value = _field(value, name)
        return value

    def term(self, t: _Term, dot: Any) -> Any:
        if t.kind == "literal":
            return t.value
        if t.kind == "dot":
            return self.chain(dot, t.chain)
        if t.kind == "variable":
            return self.chain(self.scope.get(t.value), t.chain)
        if t.kind == "pipe":
            return self.chain(self.pipeline(t.value, dot), t.chain)
        if t.kind == "ident":
            return _call_builtin(t.value, [])
        raise AssertionError(t.kind)

    def command(self, cmd: list[_Term], dot: Any, piped: tuple[Any, ...]) -> Any:
        head = cmd[0]
        if head.kind == "ident":
            if head.value in ("and", "or"):
                return self._and_or(head.value, cmd[1:], dot, piped)
            args = [self.term(t, dot) for t in cmd[1:]] + list(piped)
            return _call_builtin(head.value, args)
        if len(cmd) > 1 or piped:
            if head.kind == "literal" or head.kind == "pipe" or (head.kind == "dot" and not head.chain):
                raise TemplateError(f"can't give argument to non-function {go_str(self.term(head, dot))}")
            raise TemplateError(
                f"{'.' + '.'.join(head.chain) if head.chain else head.value} has arguments but is no method"
            )
        return self.term(head, dot)

    def _and_or(self, name: str, terms: list[_Term], dot: Any, piped: tuple[Any, ...]) -> Any:
        lazy: list[Callable[[], Any]] = [lambda t=t: self.term(t, dot) for t in terms]  # type: ignore[misc]
        lazy += [lambda p=p: p for p in piped]  # type: ignore[misc]
        if not lazy:
            raise TemplateError(f"wrong number of args for {name}: want at least 1 got 0")
        value: Any = None
        for get in lazy:
            value = get()
            if _truth(value) == (name == "or"):
                return value
        return value

    def pipeline(self, pipe: _Pipeline, dot: Any) -> Any:
        value: tuple[Any, ...] = ()
        for cmd in pipe.commands:
            value = (self.command(cmd, dot, value),)
        result = value[0]
        if pipe.decl and len(pipe.decl) == 1:
            if pipe.assign:
                self.scope.assign(pipe.decl[0], result)
            else:
                self.scope.declare(pipe.decl[0], result)
        return result

    def run(self, nodes: list[Any], dot: Any, out: list[str]) -> None:
        for node in nodes:
            if isinstance(node, _Text):
                out.append(node.text)
            elif isinstance(node, _Action):
                value = self.pipeline(node.pipe, dot)
                if not node.pipe.decl:
                    out.append(go_str(value))
            elif isinstance(node, _Jump):
                raise _Break() if node.kind == "break" else _Continue()
            elif isinstance(node, _Block):
                self.block(node, dot, out)

    def block(self, node: _Block, dot: Any, out: list[str]) -> None:
        mark = self.scope.mark()
        try:
            if node.kind == "range":
                self.range(node, dot, out, mark)
                return
            value = self.pipeline(node.pipe, dot)
            if _truth(value):
                self.run(node.body, value if node.kind == "with" else dot, out)
            else:
                self.run(node.else_body, dot, out)
        finally:
            self.scope.pop_to(mark)

    def range(self, node: _Block, dot: Any, out: list[str], mark: int) -> None:
        names = node.pipe.decl
        value = self.pipeline(_Pipeline(commands=node.pipe.commands), dot)
        items: list[tuple[Any, Any]]
        if isinstance(value, GoStruct):
            raise TemplateError("range can't iterate over struct")
        if isinstance(value, dict):
            items = sorted(value.items())
        elif isinstance(value, list | tuple):
            items = list(enumerate(value))
        elif isinstance(value, int) and not isinstance(value, bool):
            items = [(i, i) for i in range(value)]
        elif value is None or value is NO_VALUE:
            items = []
        else:
            raise TemplateError(f"range can't iterate over {go_str(value)}")
        if not items:
            self.run(node.else_body, dot, out)
            return
        for key, item in items:
            self.scope.pop_to(mark)
            if len(names) == 1:
                self.scope.declare(names[0], item)
            elif len(names) == 2:
                self.scope.declare(names[0], key)
                self.scope.declare(names[1], item)
            try:
                self.run(node.body, item, out)
            except _Continue:
                continue
            except _Break:
                break


def render(template: str, data: Any) -> str:
    """Execute ``template`` on ``data``; any problem is one ``TemplateError`` line."""
    tree = parse(template)
    out: list[str] = []
    try:
        _Exec(data).run(tree, data, out)
    except (_Break, _Continue):  # pragma: no cover - parse() refuses them outside range
        raise TemplateError("break/continue outside range") from None
    except RecursionError:
        raise TemplateError("template nests too deeply") from None
    except (TypeError, ValueError, KeyError, IndexError, OverflowError) as exc:
        raise TemplateError(f"{type(exc).__name__}: {exc}") from None
    return "".join(out)


def skopeo_format(template: str) -> str:
    """containers/common ``report.NormalizeFormat``: ``\\t``/``\\n`` escapes, and a final newline."""
    text = template.replace("\\t", "\t").replace("\\n", "\n")
    return text if text.endswith("\n") else text + "\n"


def render_inspect(template: str, data: Any) -> str:
    """``inspect --format`` as skopeo runs it: the user's template inside ``{{range .}}…{{end}}`` over a
    one-item list (containers/common ``report``), so ``$`` is that list, as in skopeo."""
    return render("{{range .}}" + skopeo_format(template) + "{{end}}", [data])
