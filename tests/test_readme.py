"""The README runs as written: its quickstart through the real commands, its install and test lines in CI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests import readme
from tests.helpers import REPO as ROOT


@pytest.mark.slow
def test_quickstart_captions_the_shapes_it_drew(quickstart):
    *_, generate = readme.commands("Quickstart")
    proc = quickstart.results[generate]
    samples = quickstart.root / "runs" / "tiny-stage2" / "samples"
    truth = {(samples / a["image"]).name: a["caption"]
             for a in json.loads((samples / "annotations.json").read_text())}
    texts = dict(line.rsplit(": ", 1) for line in proc.stdout.splitlines())
    assert sorted(Path(p).name for p in texts) == sorted(truth)
    accuracy = sum(texts[p] == truth[Path(p).name] for p in texts) / len(texts)
    assert accuracy > 0.5, texts  # chance: 1/12


def test_install_and_test_lines_are_what_ci_runs():
    """CI installs with the README's line and runs the README's test command: both appear in .ci/run verbatim."""
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    install, test = readme.commands("Install")[0], readme.commands("Tests")[0]
    assert install in ci and test in ci
    assert "[test]" in install  # the test extra: every extra, and pytest
    test_extra = next(line for line in (ROOT / "pyproject.toml").read_text().splitlines() if line.startswith("test ="))
    assert '"blip2[all]"' in test_extra and '"pytest' in test_extra


def _parse(words: list[str]) -> None:
    """Resolve ``blip2 WORDS`` to its command and parse its options and values, without running it."""
    import typer.main

    from blip2cli.cli.app import app

    command, rest, path = typer.main.get_command(app), list(words), ["blip2"]
    while hasattr(command, "commands") and rest and not rest[0].startswith("-"):
        path.append(rest[0])
        command = command.commands.get(rest.pop(0))
        assert command is not None, f"no such command: {' '.join(path)}"
    command.make_context(" ".join(path), rest)  # raises a usage error on an unknown option or a bad value


def test_every_blip2_line_of_the_readme_parses():
    """Each command line the README shows names a real command and only options it has, with valid values."""
    lines = readme.blip2_lines()
    assert len(lines) > 25
    for words in lines:
        _parse(words)


def test_every_example_in_the_help_parses():
    """The examples that ``--help`` shows are valid command lines too."""
    import shlex

    import typer.main

    from blip2cli.cli.app import app

    def commands(command):
        yield command
        for sub in getattr(command, "commands", {}).values():
            yield from commands(sub)

    examples = [line.strip() for c in commands(typer.main.get_command(app)) for line in (c.help or "").splitlines()
                if line.strip().startswith(("blip2 ", "deepspeed "))]
    assert len(examples) >= 10
    for example in examples:
        words = shlex.split(example.split(" > ")[0])
        _parse(words[words.index(next(w for w in words if w in ("blip2", "blip2)"))) + 1:])
