"""``ferry completion SHELL``: a completion script for the verbs and their flags, built from the parser."""

from __future__ import annotations

import argparse


def _verbs(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _flags(parser: argparse.ArgumentParser) -> list[str]:
    out: list[str] = []
    for action in parser._actions:
        if action.help == argparse.SUPPRESS:
            continue
        out.extend(o for o in action.option_strings if o.startswith("--"))
    return sorted(set(out))


def table(parser: argparse.ArgumentParser) -> dict[str, list[str]]:
    """Verb → its long flags; ``""`` → the global flags."""
    out = {"": _flags(parser)}
    for name, sub in _verbs(parser).items():
        out[name] = _flags(sub) + sorted(_verbs(sub))
    return out


def _bash(t: dict[str, list[str]]) -> str:
    cases = "".join(f'        {verb}) words="{" ".join(flags)}" ;;\n' for verb, flags in t.items() if verb)
    verbs = " ".join(v for v in t if v)
    return f"""# bash completion for ferry
_ferry() {{
    local cur="${{COMP_WORDS[COMP_CWORD]}}" verb="" w words
    for w in "${{COMP_WORDS[@]:1:COMP_CWORD-1}}"; do
        case "$w" in -*) ;; *) verb="$w"; break ;; esac
    done
    case "$verb" in
        "") words="{" ".join(t[""])} {verbs}" ;;
{cases}    esac
    COMPREPLY=($(compgen -W "$words" -- "$cur"))
}}
complete -o default -F _ferry ferry
"""


def _zsh(t: dict[str, list[str]]) -> str:
    return "#compdef ferry\nautoload -U +X bashcompinit && bashcompinit\n" + _bash(t)


def _fish(t: dict[str, list[str]]) -> str:
    lines = ["# fish completion for ferry", "complete -c ferry -f"]
    verbs = [v for v in t if v]
    lines.append(f'complete -c ferry -n "not __fish_seen_subcommand_from {" ".join(verbs)}" -a "{" ".join(verbs)}"')
    for flag in t[""]:
        lines.append(f"complete -c ferry -l {flag[2:]}")
    for verb in verbs:
        for word in t[verb]:
            if word.startswith("--"):
                lines.append(f"complete -c ferry -n '__fish_seen_subcommand_from {verb}' -l {word[2:]}")
            else:
                lines.append(f"complete -c ferry -n '__fish_seen_subcommand_from {verb}' -a {word}")
    return "\n".join(lines) + "\n"


def _powershell(t: dict[str, list[str]]) -> str:
    entries = "\n".join(f"    '{verb}' = @({', '.join(repr(w) for w in words)})" for verb, words in t.items())
    verbs = ", ".join(repr(v) for v in t if v)
    return f"""# powershell completion for ferry
$ferryWords = @{{
{entries}
}}
Register-ArgumentCompleter -Native -CommandName ferry -ScriptBlock {{
    param($wordToComplete, $commandAst, $cursorPosition)
    $verb = ($commandAst.CommandElements | Select-Object -Skip 1 | Where-Object {{ $_ -notlike '-*' }} |
        Select-Object -First 1)
    $choices = if ($verb) {{ $ferryWords["$verb"] }} else {{ $ferryWords[''] + @({verbs}) }}
    $choices | Where-Object {{ $_ -like "$wordToComplete*" }} |
        ForEach-Object {{ [System.Management.Automation.CompletionResult]::new($_, $_, 'ParameterValue', $_) }}
}}
"""


def script(parser: argparse.ArgumentParser, shell: str) -> str:
    t = table(parser)
    return {"bash": _bash, "zsh": _zsh, "fish": _fish, "powershell": _powershell}[shell](t)
