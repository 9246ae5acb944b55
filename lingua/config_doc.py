"""The config reference, read from the dataclasses themselves so it cannot drift from them: every key with its type,
default and one-line description (the comment on its field, on the field's line or right above it).

    print(help_text(TrainArgs))            # what `python -m apps.main.train --help` prints (lingua.args.run_cli)
    print(help_text(TrainArgs, "model"))   # `--help model`: one section
    markdown_table(TrainArgs)              # README's config reference (apps/main/config_reference.py writes it)
"""

import ast
import dataclasses
import functools
import inspect
import textwrap
import typing
from dataclasses import dataclass
from typing import Optional

from lingua.errors import ConfigError

GENERAL = "general"  # the section of top-level keys that are not a nested dataclass


@dataclass(frozen=True)
class KeyDoc:
    key: str  # dotted, as on the command line
    type: str
    default: str  # as YAML would write it
    doc: str  # one line; "" when the field has no comment


@functools.cache  # inspect.getsource parses the class's whole module each time
def _field_comments(cls) -> dict[str, str]:
    """name -> the comment of each field `cls` itself declares: the comment lines right above it, then the one at
    the end of its line."""
    try:
        lines = textwrap.dedent(inspect.getsource(cls)).splitlines()
    except (OSError, TypeError):  # a class made at run time (dataclasses.make_dataclass) has no source
        return {}
    comments = {}
    for node in ast.parse("\n".join(lines)).body[0].body:
        if not isinstance(node, ast.AnnAssign) or not isinstance(node.target, ast.Name):
            continue
        above, i = [], node.lineno - 2
        while i >= 0 and lines[i].strip().startswith("#"):
            above.insert(0, lines[i].strip().lstrip("#").strip())
            i -= 1
        _, hash_, trailing = lines[node.end_lineno - 1].partition("  # ")
        comments[node.target.id] = " ".join(above + ([trailing.strip()] if hash_ else []))
    return comments


def _comment(cls, name: str) -> str:
    """The comment of field `name` where it is declared: `cls` or the first base class that has one."""
    for klass in cls.__mro__:
        if dataclasses.is_dataclass(klass) and name in klass.__dict__.get("__annotations__", {}):
            found = _field_comments(klass).get(name)
            if found:
                return found
    return ""


def _type_name(tp) -> str:
    args = typing.get_args(tp)
    if typing.get_origin(tp) is typing.Union:
        return " | ".join("null" if a is type(None) else _type_name(a) for a in args)
    if args:
        return f"{getattr(typing.get_origin(tp), '__name__', str(tp))}[{', '.join(_type_name(a) for a in args)}]"
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _yaml(value) -> str:
    if value is None or isinstance(value, bool):
        return {None: "null", True: "true", False: "false"}[value]
    return '""' if value == "" else str(value)


def key_docs(cls, prefix: str = "", defaults=None) -> list[KeyDoc]:
    """Every leaf key of the schema `cls`, depth first in field order. Defaults are read from `cls()` (every schema's
    defaults are a valid config): a section's default may differ from its class's (checkpoint.eval.every)."""
    hints, defaults = typing.get_type_hints(cls), cls() if defaults is None else defaults
    rows = []
    for f in dataclasses.fields(cls):
        tp, value = hints[f.name], getattr(defaults, f.name)
        if dataclasses.is_dataclass(tp):
            rows += key_docs(tp, f"{prefix}{f.name}.", value)
        else:
            rows.append(KeyDoc(prefix + f.name, _type_name(tp), _yaml(value), _comment(cls, f.name)))
    return rows


def sections(cls) -> dict[str, list[KeyDoc]]:
    """The keys grouped by their first part: `general` (top-level keys), then one section per nested dataclass."""
    out: dict[str, list[KeyDoc]] = {}
    for row in key_docs(cls):
        out.setdefault(row.key.split(".")[0] if "." in row.key else GENERAL, []).append(row)
    return out


def help_text(cls, section: Optional[str] = None) -> str:
    """The reference of `cls` as plain text, one key per line, by section; `section` picks one."""
    groups = sections(cls)
    if section is not None:
        if section not in groups:
            raise ConfigError(f"--help {section}: no such section (sections: {', '.join(groups)})")
        groups = {section: groups[section]}
    rows = [r for g in groups.values() for r in g]
    widths = [max(len(getattr(r, c)) for r in rows) for c in ("key", "type", "default")]
    lines = [f"Config keys ({cls.__name__}): key=value on the command line, or in a YAML file given as config=PATH.",
             f"Sections: {', '.join(sections(cls))}; `--help SECTION` shows one."]
    for name, group in groups.items():
        lines += ["", f"[{name}]"]
        lines += [f"  {r.key:<{widths[0]}}  {r.type:<{widths[1]}}  {r.default:<{widths[2]}}  {r.doc}".rstrip()
                  for r in group]
    return "\n".join(lines)


def markdown_table(cls, keys: Optional[set] = None) -> str:
    """The reference of `cls` as one markdown table (key, type, default, description); `keys` keeps only those."""
    lines = ["| key | type | default | description |", "| --- | --- | --- | --- |"]
    for r in key_docs(cls):
        if keys is None or r.key in keys:
            cells = (f"`{r.key}`", r.type, f"`{r.default}`", r.doc)
            lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines)
