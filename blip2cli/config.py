"""Recipes: YAML files read into typed dataclasses, with strict keys and ``--set a.b=c`` overrides."""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

import yaml

from .runtime.errors import Blip2Error

T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class Check:
    """The values a recipe field allows, declared beside the field with :func:`checked`.

    Bounds apply to a number, or to each item of a list of numbers; a float with any bound must also be
    finite. ``choices`` lists the allowed values (of each item, for a list).
    """

    gt: float | None = None
    ge: float | None = None
    lt: float | None = None
    le: float | None = None
    choices: tuple[Any, ...] | None = None

    def problem(self, value: Any) -> str | None:
        """Why ``value`` is not allowed (``expected ...``), or None."""
        if self.choices is not None:
            if any(item not in self.choices for item in (value if isinstance(value, list) else [value])):
                names = [str(c) for c in self.choices]
                return f"expected {', '.join(names[:-1])} or {names[-1]}" if len(names) > 1 else f"expected {names[0]}"
            return None
        for item in value if isinstance(value, list) else [value]:
            if not self._fits(item):
                return f"expected {self._describe(item)}"
        return None

    def _fits(self, x: float) -> bool:
        if isinstance(x, float) and not math.isfinite(x):
            return False
        return ((self.gt is None or x > self.gt) and (self.ge is None or x >= self.ge)
                and (self.lt is None or x < self.lt) and (self.le is None or x <= self.le))

    def _describe(self, x: Any) -> str:
        bounds = [f"{op} {b:g}" for op, b in ((">", self.gt), (">=", self.ge), ("<", self.lt), ("<=", self.le))
                  if b is not None]
        kind = "an integer" if isinstance(x, int) else "a finite number"
        return f"{kind} {' and '.join(bounds)}"


def checked(default: Any = dataclasses.MISSING, *, default_factory: Any = dataclasses.MISSING, **rules: Any) -> Any:
    """A dataclass field whose values :func:`from_dict` checks against ``rules`` (see :class:`Check`)."""
    if "choices" in rules:
        rules["choices"] = tuple(rules["choices"])
    return dataclasses.field(default=default, default_factory=default_factory, metadata={"check": Check(**rules)})


def recipes_root() -> Path:
    """The recipes directory: the package ``blip2cli.recipes``, which pyproject maps to the top-level ``recipes/``
    folder, so a checkout (editable install) and an installed wheel find the same short names."""
    return Path(str(resources.files("blip2cli.recipes")))


def recipe_path(name: str) -> Path:
    """A recipe by short name (``generate/caption``) or by file path."""
    path = Path(name)
    if path.suffix in (".yaml", ".yml") and path.exists():
        return path
    candidate = recipes_root() / f"{name}.yaml"
    if candidate.exists():
        return candidate
    known = sorted(str(p.relative_to(recipes_root()).with_suffix("")) for p in recipes_root().rglob("*.yaml"))
    close = difflib.get_close_matches(name, known, n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    raise Blip2Error(f"no recipe {name!r}{hint}")


def read_yaml(path: Path) -> dict[str, Any]:
    """A YAML mapping from ``path``; an unreadable or malformed file is a one-line error."""
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise Blip2Error(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise Blip2Error(f"{path}: a recipe must be a mapping of keys to values")
    return data


def _check_type(value: Any, hint: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check_type(value, arg, where)
            except Blip2Error as e:
                errors.append(e)
        raise errors[0]
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise Blip2Error(f"{where}: expected a list, got {value!r}")
        (item,) = typing.get_args(hint)[:1] or (Any,)
        return [_check_type(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise Blip2Error(f"{where}: expected a mapping, got {value!r}")
        return value
    if hint is Any:
        return value
    if hint in (int, float) and isinstance(value, str):
        value = _number(value, hint, where)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float, str, bool) and not (
            isinstance(value, hint) and not (hint is int and isinstance(value, bool))):
        raise Blip2Error(f"{where}: expected {hint.__name__}, got {value!r}")
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise Blip2Error(f"{where}: expected a mapping, got {value!r}")
        return from_dict(hint, value, where)
    return value


def _number(text: str, hint: type, where: str) -> Any:
    """A number written as text: YAML 1.1 reads ``5e-4`` and ``1e3`` as strings."""
    try:
        number = float(text.strip())
    except ValueError:
        raise Blip2Error(f"{where}: expected {hint.__name__}, got {text!r}") from None
    if hint is int:
        if not number.is_integer():
            raise Blip2Error(f"{where}: expected int, got {text!r}")
        return int(number)
    return number


def from_dict(cls: type[T], data: dict[str, Any], where: str = "recipe") -> T:
    """Build dataclass ``cls`` from ``data``; unknown keys, wrong types and values outside a field's
    :func:`checked` rules are one-line errors naming the key."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            close = difflib.get_close_matches(key, list(fields), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise Blip2Error(f"{where}: unknown key {key!r}{hint}")
        kwargs[key] = _check_type(value, hints[key], f"{where}.{key}")
        check = fields[key].metadata.get("check")
        problem = check.problem(kwargs[key]) if check is not None and kwargs[key] is not None else None
        if problem:
            raise Blip2Error(f"{where}.{key} {kwargs[key]!r}: {problem}")
    return cls(**kwargs)


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b=c`` strings (values parsed as YAML scalars) to a nested dict."""
    for item in overrides:
        if "=" not in item:
            raise Blip2Error(f"--set {item!r}: expected KEY=VALUE, e.g. optim.lr=1e-4")
        key, raw = item.split("=", 1)
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise Blip2Error(f"--set {item!r}: {part!r} is not a section")
        node[parts[-1]] = yaml.safe_load(raw)
    return data


def load_recipe(cls: type[T], name: str, overrides: list[str] = ()) -> T:
    """A recipe by short name (``pretrain/stage1_eva-g``) or path, with ``a.b=c`` overrides, as a ``cls`` instance;
    an unknown key or a bad value is a one-line error naming it."""
    path = recipe_path(name)
    return from_dict(cls, apply_overrides(read_yaml(path), list(overrides)), where=str(name))


def to_dict(obj: Any) -> Any:
    """A recipe dataclass as plain data (for recipe.yaml in run directories)."""
    return dataclasses.asdict(obj) if dataclasses.is_dataclass(obj) else obj
