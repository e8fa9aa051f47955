"""A small Go ``text/template`` subset for ``--format``: fields, pipelines of json/join/upper/lower/len/index,
``range``, ``if``/``else`` and ``with``; values print as Go's ``fmt`` prints them."""

from __future__ import annotations

import json
import re
import shlex
from typing import Any

from worker.registry import InvalidInput

_ACTION = re.compile(r"{{-?\s*(.*?)\s*-?}}", re.S)


class GoStruct(dict[str, Any]):
    """A dict standing for a Go struct: a field it lacks is a template error, not ``<no value>`` (that is maps)."""


class GoTime(str):
    """An RFC 3339 timestamp that a template prints the way Go prints a ``time.Time``."""

    def __str__(self) -> str:
        return go_time_string(str.__str__(self))


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


def go_str(value: Any) -> str:
    if value is None:
        return "<no value>"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + " ".join(go_str(v) for v in value) + "]"
    if isinstance(value, dict):
        return "map[" + " ".join(f"{k}:{go_str(v)}" for k, v in sorted(value.items())) + "]"
    return str(value)


class _Node:
    pass


class _Text(_Node):
    def __init__(self, text: str) -> None:
        self.text = text


class _Expr(_Node):
    def __init__(self, expr: str) -> None:
        self.expr = expr


class _Block(_Node):
    def __init__(self, kind: str, expr: str) -> None:
        self.kind = kind
        self.expr = expr
        self.body: list[_Node] = []
        self.else_body: list[_Node] = []


def _parse(template: str) -> list[_Node]:
    root: list[_Node] = []
    stack: list[tuple[_Block, bool]] = []

    def current() -> list[_Node]:
        if not stack:
            return root
        block, in_else = stack[-1]
        return block.else_body if in_else else block.body

    pos = 0
    for m in _ACTION.finditer(template):
        if m.start() > pos:
            current().append(_Text(template[pos : m.start()]))
        pos = m.end()
        action = m.group(1).strip()
        word = action.split(" ", 1)[0]
        if word in ("range", "if", "with"):
            block = _Block(word, action[len(word) :].strip())
            current().append(block)
            stack.append((block, False))
        elif word == "else":
            if not stack:
                raise InvalidInput("invalid --format template: {{else}} outside a block")
            stack[-1] = (stack[-1][0], True)
        elif word == "end":
            if not stack:
                raise InvalidInput("invalid --format template: unexpected {{end}}")
            stack.pop()
        else:
            current().append(_Expr(action))
    if stack:
        raise InvalidInput(f"invalid --format template: unclosed {{{{{stack[-1][0].kind}}}}}")
    if pos < len(template):
        current().append(_Text(template[pos:]))
    return root


def _field(dot: Any, path: str) -> Any:
    value = dot
    for part in path.split(".")[1:]:
        if not part:
            continue
        if isinstance(value, dict) and part in value:
            value = value[part]
        elif isinstance(value, GoStruct):
            raise InvalidInput(f"invalid --format template: can't evaluate field {part}")
        elif isinstance(value, dict):
            return None
        else:
            raise InvalidInput(f"invalid --format template: can't evaluate field {part}")
    return value


def _variable(token: str, variables: dict[str, Any]) -> Any:
    name, dot_, rest = token.partition(".")
    if name not in variables:
        raise InvalidInput(f"invalid --format template: undefined variable {name}")
    value = variables[name]
    return _field(value, "." + rest) if dot_ else value


def _arg(dot: Any, token: str, variables: dict[str, Any]) -> Any:
    if token.startswith("$"):
        return _variable(token, variables)
    if token.startswith("."):
        return _field(dot, token if token != "." else ".")
    if token.startswith('"') or token.startswith("'") or token.startswith("`"):
        return token
    try:
        return int(token)
    except ValueError:
        pass
    return token


def _call(dot: Any, words: list[str], variables: dict[str, Any], piped: Any = None, has_pipe: bool = False) -> Any:
    fn, args = words[0], [_arg(dot, w, variables) for w in words[1:]]
    if has_pipe:
        args.append(piped)
    if fn.startswith("$") and not args:
        return _variable(fn, variables)
    if fn.startswith(".") and not args:
        return _field(dot, fn)
    if fn == "json":
        return json.dumps(args[0], separators=(",", ":"))
    if fn == "join":
        items, sep = args[0], args[1]
        return sep.join(go_str(i) for i in (items or []))
    if fn == "upper":
        return go_str(args[0]).upper()
    if fn == "lower":
        return go_str(args[0]).lower()
    if fn == "len":
        return len(args[0] or [])
    if fn == "index":
        value = args[0]
        for key in args[1:]:
            value = value.get(key) if isinstance(value, dict) else (value[key] if value else None)
        return value
    if fn == "printf":
        fmt = str(args[0])
        return fmt.replace("%s", "{}").replace("%v", "{}").replace("%d", "{}").format(*[go_str(a) for a in args[1:]])
    raise InvalidInput(f"invalid --format template: function {fn!r} not defined")


def _eval(dot: Any, expr: str, variables: dict[str, Any]) -> Any:
    value: Any = None
    has = False
    for stage in expr.split("|"):
        try:
            words = shlex.split(stage.strip(), posix=True)
        except ValueError as exc:
            raise InvalidInput(f"invalid --format template: {exc}") from None
        if not words:
            raise InvalidInput("invalid --format template: empty pipeline")
        value = _call(dot, words, variables, value, has)
        has = True
    return value


def _truthy(value: Any) -> bool:
    return bool(value) and value != "<no value>"


def _run(nodes: list[_Node], dot: Any, out: list[str], variables: dict[str, Any]) -> None:
    for node in nodes:
        if isinstance(node, _Text):
            out.append(node.text)
        elif isinstance(node, _Expr):
            out.append(go_str(_eval(dot, node.expr, variables)))
        elif isinstance(node, _Block):
            expr = node.expr
            names: list[str] = []
            if node.kind == "range" and ":=" in expr:
                declared, expr = (part.strip() for part in expr.split(":=", 1))
                names = [n.strip() for n in declared.split(",") if n.strip()]
                if not 1 <= len(names) <= 2 or not all(n.startswith("$") for n in names):
                    raise InvalidInput(f"invalid --format template: bad range declaration {declared!r}")
            value = _eval(dot, expr, variables)
            if node.kind == "range":
                # Go visits a map's entries in key order
                if isinstance(value, dict):
                    pairs = sorted(value.items())
                else:
                    pairs = list(enumerate(value or []))
                if pairs:
                    for key, item in pairs:
                        scope = dict(variables)
                        if len(names) == 1:
                            scope[names[0]] = item
                        elif len(names) == 2:
                            scope[names[0]], scope[names[1]] = key, item
                        _run(node.body, item, out, scope)
                else:
                    _run(node.else_body, dot, out, variables)
            elif node.kind == "if":
                _run(node.body if _truthy(value) else node.else_body, dot, out, variables)
            else:
                if _truthy(value):
                    _run(node.body, value, out, variables)
                else:
                    _run(node.else_body, dot, out, variables)


def render(template: str, data: Any) -> str:
    template = template.replace("\\n", "\n").replace("\\t", "\t")
    out: list[str] = []
    _run(_parse(template), data, out, {"$": data})
    return "".join(out)
