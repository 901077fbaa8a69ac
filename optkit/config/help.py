"""``optkit bench --help``: the config groups with their choices and every key with its type, default and
meaning, all read from the schema (optkit/config/schema.py) and conf/, so the help cannot drift from them."""

from __future__ import annotations

import textwrap
from typing import Any, Iterable, List, Optional

from omegaconf import OmegaConf

from optkit.config.compose import CONF_DIR, GROUPS, group_choices
from optkit.config.keys import KeySpec, schema_keys

WIDTH = 100
MEANING_COLUMN = 46

USAGE = """usage: optkit bench [KEY=VALUE ...] [--debug]
       optkit bench --help [GROUP | KEY]    this help, or only the keys starting with GROUP or KEY

Runs a suite (suite=NAME), or one point when model / opt / train / data keys come without a suite,
each point in its own process. With neither: suite=smoke on a CPU machine, suite=e2e with a GPU.
A comma list on a suite axis sweeps it (suite=e2e opt=baseline,full). Exit codes: 0 every point ok,
oom or skipped; 1 a point errored or timed out; 2 a usage or config error (nothing ran); 3 the
results could not be written; 130 interrupted. --debug (or OPTKIT_DEBUG=1) adds tracebacks."""


def _default_choices() -> dict:
    """The choice conf/config.yaml's defaults list picks for each group."""
    chosen = {}
    for entry in OmegaConf.load(CONF_DIR / "config.yaml").get("defaults", []):
        if OmegaConf.is_dict(entry) or isinstance(entry, dict):
            chosen.update({str(k): str(v) for k, v in dict(entry).items()})
    return chosen


def _wrapped(head: str, text: str, indent: int) -> List[str]:
    """``head`` then ``text`` wrapped to WIDTH, continuation lines indented by ``indent``."""
    if len(head) + len(text) <= WIDTH:
        return [head + text]
    if len(head) > MEANING_COLUMN:  # too little room beside the head: the text goes below it
        return [head.rstrip()] + textwrap.wrap(text, WIDTH, initial_indent=" " * indent, subsequent_indent=" " * indent)
    lines = textwrap.wrap(text, WIDTH - len(head))
    return [head + lines[0]] + [" " * len(head) + line for line in lines[1:]]


def group_lines(wanted: Optional[str] = None) -> List[str]:
    defaults = _default_choices()
    lines = ["Config groups (GROUP=CHOICE picks conf/GROUP/CHOICE.yaml; * the default):"]
    for group in GROUPS:
        if wanted and not group.startswith(wanted.split(".")[0]):
            continue
        names = [f"{n}*" if n == defaults.get(group) else n for n in group_choices(group)]
        lines += _wrapped(f"  {group + '=':<8}", " | ".join(names), 10)
    return lines


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(map(str, value)) + "]"
    if isinstance(value, dict):
        return "{}" if not value else "{...}"
    return str(value)


def _meaning(key: KeySpec) -> str:
    text = key.meaning
    if key.choices:
        text += f" ({' | '.join(map(_show, key.choices))})"
    if key.minimum is not None:
        text += f" (>= {_show(key.minimum)})"
    return text


def key_lines(keys: Iterable[KeySpec]) -> List[str]:
    keys = [k for k in keys if not k.is_node]
    if not keys:
        return []
    heads = [f"  {k.path}  {k.type_name} = {_show(k.default)}" for k in keys]
    column = min(max(map(len, heads)) + 2, MEANING_COLUMN)  # longer heads put their meaning below
    lines: List[str] = []
    for key, head in zip(keys, heads):
        lines += _wrapped(f"{head:<{column}}" if len(head) + 2 <= column else head + "  ", _meaning(key), 8)
    return lines


def bench_help(wanted: Optional[str] = None) -> str:
    """The whole help, or only the groups and keys whose path starts with ``wanted`` (``train``, ``opt.kernels``)."""
    keys = schema_keys()
    if wanted and not any(path == wanted or path.startswith(wanted) for path in keys):
        top = ", ".join(k for k in keys if "." not in k)
        return f"optkit bench --help: nothing named {wanted!r}; try one of: {top}"
    sections = [USAGE, "", *group_lines(wanted), "", "Keys (GROUP.KEY=VALUE; a group's YAML may set its own values):"]
    for top in (k for k in keys.values() if "." not in k.path):
        members = [k for k in keys.values() if k.path.startswith(top.path + ".")]
        members = [k for k in members if not wanted or k.path.startswith(wanted) or wanted == top.path]
        if not members:
            continue
        doc = (top.annotation.__doc__ or "").strip().splitlines()[0]
        sections += ["", *_wrapped(f"{top.path}: ", doc, 2), *key_lines(members)]
    return "\n".join(sections)
