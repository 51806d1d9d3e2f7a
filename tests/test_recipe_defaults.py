"""Recipes hold the numbers: a schema's code default never disagrees with a shipped recipe.

For every schema and every field with a code default (nested dataclasses walked, lists of them item by item):
if a shipped recipe of that schema sets the field, every shipped recipe that sets it sets the default's value.
Otherwise the field must have no default (every recipe says it), so that

- a recipe that leaves the field out never falls back to a value that differs from what the other recipes of its
  schema set, and
- a value a recipe sets (a paper value) is not repeated in code as another number.

A default that is empty (``None``, ``""``, ``[]``, ``{}``) says "not given": the field carries no value of its own
(the model's own prompt, no LLM in stage 1, no note), so it cannot disagree with a recipe. Flat keys kept for
recipes written before ``decoding:`` (``alias_of`` in a field's metadata) are another name for a nested field,
which is walked there.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any

import pytest

from blip2cli.config import load_recipe, read_yaml, recipes_root
from tests.helpers import recipe_schema

MISSING = dataclasses.MISSING


def _shipped() -> dict[type, list[tuple[str, dict, Any]]]:
    """Each schema's shipped recipes: (short name, the YAML mapping as written, the loaded recipe)."""
    root = recipes_root()
    by_schema: dict[type, list[tuple[str, dict, Any]]] = {}
    for path in sorted(root.rglob("*.yaml")):
        name = path.relative_to(root).with_suffix("").as_posix()
        schema = recipe_schema(name)
        if schema is not None:
            by_schema.setdefault(schema, []).append((name, read_yaml(path), load_recipe(schema, name)))
    return by_schema


def _default(f: dataclasses.Field) -> Any:
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:
        return f.default_factory()
    return MISSING


def _empty(value: Any) -> bool:
    return value is None or (isinstance(value, (str, list, tuple, dict)) and not value)


def _dataclasses_in(hint: Any) -> list[type]:
    """The dataclasses a field's type names: itself, members of a union, items of a list."""
    if dataclasses.is_dataclass(hint):
        return [hint]
    if typing.get_origin(hint) in (typing.Union, types.UnionType, list, tuple):
        return [d for arg in typing.get_args(hint) for d in _dataclasses_in(arg)]
    return []


def _problems(cls: type, entries: list[tuple[str, dict, Any]], where: str) -> list[str]:
    """What disagrees among ``entries`` (recipe name, its mapping at this level, the loaded object) of ``cls``."""
    problems = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if "alias_of" in f.metadata:
            continue
        path = f"{where}.{f.name}" if where else f.name
        setting = [(name, raw[f.name], getattr(obj, f.name)) for name, raw, obj in entries if f.name in raw]
        if _dataclasses_in(hints[f.name]):
            nested: dict[type, list] = {}
            for name, raw, obj in setting:
                pairs = zip(raw, obj) if isinstance(raw, list) and isinstance(obj, list) else [(raw, obj)]
                for i, (r, o) in enumerate(pairs):
                    if isinstance(r, dict) and dataclasses.is_dataclass(o):
                        nested.setdefault(type(o), []).append((name if not isinstance(raw, list) else f"{name}[{i}]",
                                                               r, o))
            for sub, items in nested.items():
                problems += _problems(sub, items, f"{path}[]" if isinstance(setting[0][1], list) else path)
        default = _default(f)
        if default is MISSING or _empty(default) or dataclasses.is_dataclass(default):
            continue
        differ = [f"{name} sets {value!r}" for name, raw_value, value in setting
                  if not (isinstance(raw_value, dict) or isinstance(raw_value, list) and
                          any(isinstance(r, dict) for r in raw_value)) and value != default]
        if differ:
            problems.append(f"{cls.__name__}.{f.name} ({path}) defaults to {default!r} but {', '.join(differ)}: "
                            "give it no default (every recipe says it) or the recipes' one value")
    return problems


SHIPPED = _shipped()


@pytest.mark.parametrize("schema", list(SHIPPED), ids=lambda s: s.__name__)
def test_code_defaults_agree_with_every_shipped_recipe(schema):
    problems = _problems(schema, SHIPPED[schema], "")
    assert not problems, "\n".join(problems)


def test_every_schema_has_shipped_recipes():
    names = {s.__name__ for s in SHIPPED}
    assert names == {"PretrainRecipe", "Decoding", "GenerationEval", "RetrievalEval", "CapFiltRecipe",
                     "DownloadRecipe"}


@dataclasses.dataclass
class _Inner:
    rate: float = 1.0
    note: str = ""


@dataclasses.dataclass
class _Outer:
    inner: _Inner = dataclasses.field(default_factory=_Inner)
    items: list[_Inner] = dataclasses.field(default_factory=list)
    steps: int = 10
    size: int | None = None


def test_the_walk_finds_a_default_that_a_recipe_contradicts():
    """The check itself: a default that one recipe overrides with another value is reported, at any depth; one
    that every recipe agrees with, or an empty one, is not."""
    entries = [("a", {"inner": {"rate": 1.1}, "steps": 10}, _Outer(_Inner(1.1), steps=10)),
               ("b", {"inner": {"note": "x"}, "size": 3, "items": [{"rate": 2.0}]},
                _Outer(_Inner(note="x"), [_Inner(2.0)], size=3))]
    problems = _problems(_Outer, entries, "")
    assert len(problems) == 2, problems
    assert "_Inner.rate (inner.rate) defaults to 1.0 but a sets 1.1" in problems[0]
    assert "_Inner.rate (items[].rate) defaults to 1.0 but b[0] sets 2.0" in problems[1]
