"""The keys the schema declares, and the check of one ``key=value`` override against them.

``optkit bench --help`` lists these keys; the check runs before Hydra sees an override, so a typo gets the
closest valid key instead of Hydra's advice to append it with ``+`` (which the schema would then ignore or
reject), and a value of the wrong type gets the type the key expects.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Dict, Optional, Tuple

from optkit.config.schema import OptkitConfig


@dataclass(frozen=True)
class KeySpec:
    """One key of the schema: ``train.batch_size``, its type, default and meaning."""

    path: str
    owner: type  # the dataclass that declares it
    name: str
    annotation: Any
    default: Any
    meaning: str
    choices: Optional[Tuple[Any, ...]]
    minimum: Optional[float]

    @property
    def is_node(self) -> bool:
        """A group of keys (``opt.kernels``), not a value."""
        return dataclasses.is_dataclass(_without_optional(self.annotation))

    @property
    def is_free_form(self) -> bool:
        """A mapping whose own keys are not declared (``model.hf_config``): anything may go below it."""
        return typing.get_origin(_without_optional(self.annotation)) in (dict, Dict)

    @property
    def type_name(self) -> str:
        return type_name(self.annotation)


def _without_optional(annotation: Any) -> Any:
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) is typing.Union and len(args) == 1:
        return args[0]
    return annotation


def type_name(annotation: Any) -> str:
    """``int``, ``str or null``, ``list of str``, ``mapping``, ``bool``."""
    inner = _without_optional(annotation)
    suffix = " or null" if inner is not annotation else ""
    origin = typing.get_origin(inner)
    if origin in (list, typing.List):
        (item,) = typing.get_args(inner) or (Any,)
        return f"list of {type_name(item)}{suffix}"
    if origin in (dict, typing.Dict):
        return f"mapping{suffix}"
    if inner is Any:
        return "any"
    return f"{getattr(inner, '__name__', str(inner))}{suffix}"


def _default_of(spec: dataclasses.Field) -> Any:
    if spec.default is not dataclasses.MISSING:
        return spec.default
    if spec.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        value = spec.default_factory()  # type: ignore[misc]
        return None if dataclasses.is_dataclass(value) else value
    return None


def _walk(cls: type, prefix: str):
    hints = typing.get_type_hints(cls)
    for spec in dataclasses.fields(cls):
        path = f"{prefix}{spec.name}"
        key = KeySpec(
            path,
            cls,
            spec.name,
            hints[spec.name],
            _default_of(spec),
            spec.metadata.get("help", ""),
            spec.metadata.get("choices"),
            spec.metadata.get("minimum"),
        )
        yield key
        if key.is_node:
            yield from _walk(_without_optional(key.annotation), f"{path}.")


@lru_cache(maxsize=1)
def schema_keys() -> Dict[str, KeySpec]:
    """Every key of the schema by its dotted path, groups and nested nodes included, in declaration order."""
    return {key.path: key for key in _walk(OptkitConfig, "")}


def closest_keys(path: str, limit: int = 1) -> list:
    """The valid keys a mistyped one most likely meant: first among its own group's keys, then any key."""
    keys = [k for k, spec in schema_keys().items() if "." in k]
    group = path.split(".", 1)[0]
    same_group = [k for k in keys if k.startswith(group + ".")]
    found = difflib.get_close_matches(path, same_group, n=limit, cutoff=0.6)
    return found or difflib.get_close_matches(path, keys, n=limit, cutoff=0.6)


def owning_key(path: str) -> Tuple[Optional[KeySpec], str]:
    """(the declared key ``path`` is, or lies below when that key is free-form; the rest of the path)."""
    keys = schema_keys()
    parts = path.split(".")
    for end in range(len(parts), 0, -1):
        spec = keys.get(".".join(parts[:end]))
        if spec is not None:
            return spec, ".".join(parts[end:])
    return None, path


def check_override(item: str, groups: Tuple[str, ...]) -> Optional[str]:
    """Why the override ``item`` cannot be applied (one line naming the fix), or None when its key is valid
    and its value has the key's type. Group choices (``model=NAME``) are checked elsewhere."""
    key, sep, value = item.partition("=")
    bare = key.lstrip("+~")
    adds, deletes = key.startswith("+"), key.startswith("~")
    if bare in groups and not adds and not deletes:
        return None
    spec, below = owning_key(bare)
    if spec is None or (below and not spec.is_free_form):
        return _unknown_key(bare, adds)
    if spec.is_free_form and below:
        return None  # keys of a mapping such as model.hf_config are the mapping's business (Hydra needs '+')
    if deletes:
        return f"{key}: the schema's keys cannot be deleted; set {bare}=VALUE instead"
    if adds:
        return f"{key}: {bare} already exists; drop the '+' ({bare}={value})"
    if not sep:
        return f"{item}: expected KEY=VALUE"
    if spec.is_node:
        example = next(k for k in schema_keys() if k.startswith(bare + "."))
        return f"{bare} is a group of keys, not a value: set one of them, e.g. {example}=..."
    return _type_error(spec, item, value)


def _unknown_key(path: str, adds: bool) -> str:
    top = path.split(".", 1)[0]
    if top not in schema_keys():
        groups = ", ".join(k for k in schema_keys() if "." not in k)
        return f"{path}: no config group {top!r}; keys start with one of: {groups}"
    guess = closest_keys(path)
    listing = f"`optkit bench --help {top}` lists {top}'s keys"
    hint = f"did you mean {guess[0]}? ({listing})" if guess else listing
    if adds:
        return f"+{path}: {top}'s keys are fixed by the schema, '+' cannot add one; {hint}"
    return f"{path} is not a key; {hint}"


def _type_error(spec: KeySpec, item: str, text: str) -> Optional[str]:
    """The expected type when ``text`` (Hydra's value grammar) cannot become the key's type."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        parsed = OverridesParser.create().parse_override(item)
    except Exception:  # noqa: BLE001 - Hydra reports bad grammar itself, with a pointer into the text
        return None
    if parsed.is_sweep_override():
        return (
            f"{item}: a comma list sweeps only a suite axis (suite=NAME with {spec.path} under axes); "
            "for one value quote it, for a list write [a,b]"
        )
    value = parsed.value()
    if isinstance(value, str) and value.startswith("${"):
        return None  # an interpolation: resolved later
    node = OmegaConf.structured(spec.owner)
    try:
        setattr(node, spec.name, value)
    except OmegaConfBaseException:
        return f"{spec.path} expects {_article(spec.type_name)}, got {text!r}"
    return None


def _article(name: str) -> str:
    if name.startswith("list"):
        return f"a {name}, e.g. [a,b]"
    if name.startswith("mapping"):
        return f"a {name}, e.g. {{a: 1}}"
    return f"an {name}" if name[0] in "aeiou" else f"a {name}"
