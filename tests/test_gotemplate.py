"""``inspect --format``: Go text/template semantics, checked against Go itself.

The oracle is skopeo 1.9 (Go's text/template with containers/common's functions): every template in
``SAME`` runs through ``skopeo inspect --format`` and ``ferry inspect --format`` on one ``dir:`` image, and
the outputs must be equal (or both must fail). Constructs newer than skopeo 1.9's Go (``else with``,
``range`` over an integer) are checked against the outputs Go documents, in ``GO_DOCUMENTED``.
"""

from __future__ import annotations

import secrets
import subprocess

import pytest

from producer.cli import main
from producer.gotemplate import GoStruct, go_sprintf, render, render_inspect
from tests.harness.images import build_image, push_image
from tests.harness.servers import RegistryServer
from tests.test_skopeo_flags import skopeo

#: templates whose output Go (via skopeo) and Ferry must agree on
SAME = [
    # the cases
    "{{if .Labels.a}}x{{else if .Labels.b}}y{{else}}z{{end}}",
    "{{if .Labels.nope}}x{{else if .Labels.nope2}}y{{else}}z{{end}}",
    '{{printf "{x} %s" .Os}}',
    # fields, maps, structs
    "{{.Os}}/{{.Architecture}} {{.Digest}}",
    "{{.Labels}}",
    "{{.Labels.b}} {{.Labels.nope}}",
    "{{.Env}}",
    "{{.Layers}}",
    "{{.RepoTags}}",
    "{{.Created}}",
    "{{$.Os}} {{$.Labels.a}}",
    "{{.NoSuchField}}",
    "{{.Os.Deeper}}",
    # printf and Go verbs
    '{{printf "%s %d %v %q %%" .Os 42 .Env .Architecture}}',
    '{{printf "%5d|%-5s|%05d|%x|%X|%o|%b" 42 "ab" -42 255 255 8 5}}',
    '{{printf "%.2f %e %g %v" 3.14159 1234.5678 0.000012 2.5}}',
    '{{printf "%t %v %q" true false 65}}',
    '{{printf "%d" .Os}}',
    '{{printf "%s %s" .Os}}',
    '{{printf "%s" .Os .Architecture}}',
    '{{printf "%c|%U" 65 66}}',
    '{{printf "%6.2f|%-8.3s|%+d" 3.14159 "abcdef" 5}}',
    '{{printf "%#x %#o %#q" 255 8 "a"}}',
    '{{printf "%v" .Labels}}',
    '{{printf "%x" "hi"}}',
    # pipelines, quoting, parentheses
    '{{"a|b" | printf "%s!"}}',
    '{{.Os | printf "%s-%s" "os"}}',
    '{{.Env | len | printf "%03d"}}',
    '{{index .Labels "a"}}|{{index .Labels "missing"}}|',
    "{{index .Env 1}}",
    "{{index .Env 9}}",
    "{{slice .Env 1}} {{slice .Os 1 3}}",
    "{{len .Os}} {{len .Labels}} {{len .Env}}",
    # comparisons and logic
    '{{eq .Os "linux"}} {{ne .Os "linux"}} {{eq 1 1}} {{eq "a" "b" "a"}}',
    "{{lt 1 2}} {{le 2 2}} {{gt 1 2}} {{ge 3 2}} {{lt 1.5 2}}",
    "{{eq .Os 1}}",
    '{{and 1 0 2}} {{and 1 2}} {{or 0 "" 3}} {{or 0 ""}} {{not 0}} {{not .Os}}',
    '{{if and .Labels.a (eq .Os "linux")}}both{{end}}',
    "{{if or .Labels.nope .Labels.b}}one{{end}}",
    # range, with, variables
    "{{range .Env}}[{{.}}]{{else}}none{{end}}",
    "{{range .RepoTags}}[{{.}}]{{else}}none{{end}}",
    "{{range $k, $v := .Labels}}{{$k}}={{$v}};{{end}}",
    "{{range $i, $e := .Env}}{{$i}}:{{$e}} {{end}}",
    "{{range $e := .Env}}<{{$e}}>{{end}}",
    "{{range $i, $e := .Env}}{{if eq $i 1}}{{break}}{{end}}{{$e}}{{end}}",
    "{{range $i, $e := .Env}}{{if eq $i 0}}{{continue}}{{end}}{{$e}}{{end}}",
    "{{with .Labels.a}}a={{.}}{{else}}no a{{end}}",
    "{{with .Labels.nope}}x{{else}}none{{end}}",
    "{{with $x := .Os}}{{$x}}{{end}}",
    "{{$x := 1}}{{if true}}{{$x = 2}}{{end}}{{$x}}",
    "{{$x := .Os}}{{range .Env}}{{$x}}{{end}}",
    "{{$n := len .Env}}{{if gt $n 1}}many{{end}}",
    # literals, comments, trimming
    '{{1}} {{-2}} {{1.5}} {{0x10}} {{\'a\'}} {{true}} {{"q\\"x"}} {{`raw`}}',
    "{{.Os}}\\n{{.Architecture}}",
    "{{.Os}}\\n{{.Architecture}}\\n",
    "{{/* a comment */}}ok",
    "a  {{- .Os -}}  b",
    "{{- /* trimmed comment */ -}} x",
    '{{print 1 2 "a" 3 .Os}} {{println .Os 1}}',
    '{{html "<a&b>"}} {{urlquery "a b&c"}} {{js "it\'s"}}',
    # escapes in the flag and the final newline
    "{{.Os}}\n",
    # errors (both tools must fail)
    "{{if .Os}}unclosed",
    "{{end}}",
    "{{else}}",
    "{{nosuchfunc .Os}}",
    "{{.Os | .Architecture}}",
    "{{range .Os}}x{{end}}",
    "{{len 3}}",
    "{{index .Labels 1}}",
    "{{$undefined}}",
    "{{break}}",
    "{{printf}}",
    "{{ .Os",
    '{{"unterminated}}',
]

#: (template, expected): Go ≥ 1.22 behaviour that skopeo 1.9's Go predates, and internal value types
GO_DOCUMENTED = [
    ("{{range 3}}{{.}}{{end}}", "012"),
    ("{{range $i := 2}}{{$i}}{{end}}", "01"),
    ("{{with .A}}a{{else with .B}}b={{.}}{{else}}none{{end}}", "b=bee"),
    ("{{with .A}}a{{else with .C}}c{{else}}none{{end}}", "none"),
    ("{{if .A}}1{{else if .C}}2{{else if .B}}3{{end}}", "3"),
    # containers/common report's functions, which skopeo 1.9 does not register for --format (Ferry does)
    ('{{join .L "|"}}', "x|y"),
    ('{{(index .L 0) | upper}} {{lower "AbC"}} {{title "hello world"}}', "X abc Hello World"),
    ("{{json .M}} {{json .B}} {{json .L}}", '{"a":"<&>","k":"v"} "bee" ["x","y"]'),
    ('{{split "a:b:c" ":"}} {{pad .B 2 1}}| {{truncate .B 2}} {{truncate .B 30}}', "[a b c]   bee | be bee"),
    # a tab from \\t: skopeo 1.9's tabwriter is never flushed and loses the line; Ferry prints the tab
    ("{{.B}}\\t{{.C}}", "bee\t0"),
]


@pytest.fixture(scope="module")
def image_dir(registry: RegistryServer, tmp_path_factory: pytest.TempPathFactory) -> str:
    repo = f"test/tmpl-{secrets.token_hex(3)}"
    img = build_image(
        "tmpl",
        layers=[300, 200],
        fmt="v2s2",
        labels={"a": "alpha", "b": "<b&>", "z": "last"},
        env=["PATH=/usr/bin", "LANG=C.UTF-8", "EMPTY="],
        created="2024-02-03T04:05:06.5Z",
    )
    push_image(registry.url, repo, "v1", img)
    out = tmp_path_factory.mktemp("tmpl") / "img"
    copied = skopeo("copy", "--src-tls-verify=false", f"docker://{registry.host}/{repo}:v1", f"dir:{out}")
    assert copied.returncode == 0
    return f"dir:{out}"


def in_process(capsys: pytest.CaptureFixture[str], *args: str) -> subprocess.CompletedProcess[str]:
    """``ferry ARGS`` run by ``main`` in this process (the table is long: no interpreter start per row)."""
    code = main(list(args))
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(list(args), code, out, err)


@pytest.mark.parametrize("template", SAME)
def test_same_output_as_go(image_dir: str, template: str, capsys: pytest.CaptureFixture[str]) -> None:
    s = skopeo("inspect", "--format", template, image_dir, check=False)
    f = in_process(capsys, "inspect", "--format", template, image_dir)
    if s.returncode != 0:
        assert f.returncode == 1, (template, f.stdout, s.stderr)
        assert f.stdout == ""
        lines = f.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("Error: invalid --format template: "), f.stderr
        assert "internal error" not in f.stderr
        return
    assert f.returncode == 0, (template, f.stderr)
    assert f.stdout == s.stdout, template


@pytest.mark.parametrize(("template", "expected"), GO_DOCUMENTED)
def test_newer_go_constructs(template: str, expected: str) -> None:
    data = GoStruct(A="", B="bee", C=0, L=["x", "y"], M={"k": "v", "a": "<&>"})
    if "\\t" in template:
        assert render_inspect(template, data) == expected + "\n"
    else:
        assert render(template, data) == expected


def test_printf_verbs_table() -> None:
    """fmt.Sprintf outputs as Go prints them (values checked with Go's fmt documentation examples)."""
    table = [
        ("%d|%5d|%-5d|%05d", [7, 7, 7, -7], "7|    7|7    |-0007"),
        ("%x %X %o %b %c", [255, 255, 8, 5, 0x263A], "ff FF 10 101 \u263a"),
        ("%q %v %s", ['a"b', ["x", 1], "s"], '"a\\"b" [x 1] s'),
        ("%.3s|%8.3f|%e", ["abcdef", 3.14159, 1e6], "abc|   3.142|1.000000e+06"),
        ("%!|%z", [1], "%!!(int=1)|%!z(MISSING)"),
        ("%", [], "%!(NOVERB)"),
        ("%d %d", [1], "1 %!d(MISSING)"),
        ("%d", [1, "x"], "1%!(EXTRA string=x)"),
        ("%s", [3], "%!s(int=3)"),
        ("%t", ["x"], "%!t(string=x)"),
        ("100%%", [], "100%"),
    ]
    for fmt, args, want in table:
        assert go_sprintf(fmt, args) == want, fmt


def test_template_error_is_one_line_never_internal(image_dir: str, capsys: pytest.CaptureFixture[str]) -> None:
    for template in ['{{printf "{x} %s"}}', "{{index .Env -1}}", "{{slice .Env 3 1}}", "{{(}}", "{{)}}"]:
        run = in_process(capsys, "inspect", "--format", template, image_dir)
        assert "internal error" not in run.stderr
        assert run.returncode in (0, 1)
        if run.returncode:
            assert run.stderr.startswith("Error: invalid --format template: ") and len(run.stderr.splitlines()) == 1


def test_variables_stay_in_their_block() -> None:
    """A variable declared in a block ends at its {{end}}; an assignment reaches the outer one."""
    data = GoStruct(L=["a"])
    with pytest.raises(Exception, match="undefined variable"):
        render("{{range .L}}{{$x := .}}{{end}}{{$x}}", data)
    assert render("{{$x := 1}}{{$x}}", data) == "1"
