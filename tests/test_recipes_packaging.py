"""The recipes live in the top-level ``recipes/`` folder and install as the package ``blip2cli.recipes``.

pyproject maps the one to the other, so an editable install of a checkout and an installed wheel find the same
short names (``pretrain/stage1_eva-g``). Building a wheel is too slow for a test; these check the mapping and
that what ``recipes_root()`` finds is what the checkout holds.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from blip2cli.config import load_recipe, read_yaml, recipe_path, recipes_root

from tests.helpers import REPO, recipe_schema

try:
    import tomllib
except ImportError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

RECIPES = REPO / "recipes"


def _names(root: Path) -> list[str]:
    return sorted(p.relative_to(root).with_suffix("").as_posix() for p in root.rglob("*.yaml"))


def _skipped(relative: Path) -> bool:
    """Caches (``__pycache__``, ``.ruff_cache``) are no packages."""
    return any(part == "__pycache__" or part.startswith(".") for part in relative.parts)


def _pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def test_checkout_recipes_are_the_ones_recipes_root_finds():
    """Every YAML under the checkout's recipes/ is found by its short name, holds the same text, and loads."""
    assert not (REPO / "blip2cli" / "recipes").exists(), "blip2cli/recipes/ would shadow the top-level recipes/"
    names = _names(RECIPES)
    assert len(names) >= 20 and "pretrain/stage1_eva-g" in names
    assert _names(recipes_root()) == names
    for name in names:
        path = recipe_path(name)
        assert path == recipes_root() / f"{name}.yaml"
        assert path.read_bytes() == (RECIPES / f"{name}.yaml").read_bytes(), f"{name}: installed copy is stale"
        schema = recipe_schema(name)
        if schema is None:
            assert read_yaml(path)
        else:
            assert isinstance(load_recipe(schema, name), schema)


def test_pyproject_maps_blip2cli_recipes_to_the_top_level_folder():
    setuptools = _pyproject()["tool"]["setuptools"]
    assert setuptools["package-dir"] == {"blip2cli.recipes": "recipes"}
    assert "**/*.yaml" in setuptools["package-data"]["blip2cli.recipes"]
    assert (RECIPES / "__init__.py").is_file()


def test_pyproject_lists_every_package():
    """packages.find cannot see a package mapped from outside blip2cli/, so pyproject lists the packages by hand:
    every folder of blip2cli/ with Python files, and every folder of recipes/, must be there."""
    listed = set(_pyproject()["tool"]["setuptools"]["packages"])
    want = {"blip2cli.recipes"}
    for folder in (REPO / "blip2cli").rglob("*"):
        if folder.is_dir() and not _skipped(folder.relative_to(REPO)) and any(folder.glob("*.py")):
            want.add(".".join(folder.relative_to(REPO).parts))
    want.add("blip2cli")
    for folder in RECIPES.rglob("*"):
        if folder.is_dir() and not _skipped(folder.relative_to(RECIPES)) and any(folder.glob("*.yaml")):
            want.add("blip2cli.recipes." + ".".join(folder.relative_to(RECIPES).parts))
    assert not want - listed, f"add to [tool.setuptools] packages in pyproject.toml: {sorted(want - listed)}"
    assert not listed - want, f"pyproject.toml lists packages that are not there: {sorted(listed - want)}"
