"""The base install (``pip install blip2``, no extra) generates, evaluates and converts; a command that needs an
extra says which one in one line.

The base environment is made from this one: a new virtual environment holding only the distributions that blip2's
installed metadata requires without an extra (and what they require, recursively), linked from this environment's
site-packages. A base dependency missing from pyproject.toml, or a module-level import of an extra's library on
the way to ``generate``, ``eval`` or ``convert``, fails here.
"""

from __future__ import annotations

import importlib.metadata as metadata
import json
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from blip2cli.runtime.errors import EXIT_BAD_INPUT
from blip2cli.runtime.extras import EXTRAS

from .eval.test_vqa_scoring import vqa_files
from .helpers import FAST, cli_env


def base_distributions() -> set[str]:
    """The distributions ``pip install blip2`` brings: blip2's requirements outside any extra, recursively."""
    wanted, todo = set(), ["blip2"]
    while todo:
        name = canonicalize_name(todo.pop())
        if name in wanted:
            continue
        wanted.add(name)
        for line in metadata.requires(name) or []:
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    return wanted


def top_level_entries() -> dict[str, set[str]]:
    """Each entry of this environment's site-packages -> the distributions whose files lie under it."""
    owners: dict[str, set[str]] = {}
    for dist in metadata.distributions():
        name = canonicalize_name(dist.metadata["Name"])
        # the RECORD's paths, read as text: ``dist.files`` builds an object per file (torch has tens of thousands)
        for first in {line.split(",", 1)[0].split("/", 1)[0] for line in (dist.read_text("RECORD") or "").splitlines()}:
            if first and first != "..":
                owners.setdefault(first, set()).add(name)
    return owners


@pytest.fixture(scope="module")
def base_python(tmp_path_factory) -> str:
    """The python of a virtual environment with the base install only."""
    venv = tmp_path_factory.mktemp("base") / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    target = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                 capture_output=True, text=True, check=True).stdout.strip())
    here = Path(sysconfig.get_paths()["purelib"])
    base = base_distributions()
    for entry, owners in top_level_entries().items():
        if owners & base and (here / entry).exists():
            (target / entry).symlink_to(here / entry)
    return str(python)


def run(python: str, *args, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([python, "-m", "blip2cli", *map(str, args)], cwd=cwd, env=cli_env(), capture_output=True,
                          text=True, timeout=600, stdin=subprocess.DEVNULL)


def test_the_base_install_lacks_every_extra(base_python):
    extras = sorted({module for modules in EXTRAS.values() for module in modules})
    probe = "import importlib.util as u, json; print(json.dumps({m: u.find_spec(m) is not None for m in %r}))"
    found = subprocess.run([base_python, "-c", probe % extras], capture_output=True, text=True, check=True)
    assert json.loads(found.stdout) == {m: False for m in extras}


def test_generate_convert_and_eval_run_on_the_base_install(base_python, hf_opt, image_files, tmp_path):
    gen = run(base_python, "generate", image_files[0], "--model", hf_opt, *FAST, "--json", cwd=tmp_path)
    assert gen.returncode == 0, gen.stderr[-2000:]
    assert json.loads(gen.stdout.splitlines()[0])["image"] == str(image_files[0])

    conv = run(base_python, "convert", hf_opt, "--out", tmp_path / "copy", "--to", "blip2", cwd=tmp_path)
    assert conv.returncode == 0, conv.stderr[-2000:]
    assert (tmp_path / "copy" / "model.safetensors").is_file()

    predictions, annotations, questions = vqa_files()
    for name, data in (("p", predictions), ("a", annotations), ("q", questions)):
        (tmp_path / f"{name}.json").write_text(json.dumps(data))
    scored = run(base_python, "eval", "vqav2", "--predictions", "p.json", "--annotations", "a.json",
                 "--questions", "q.json", "--json", cwd=tmp_path)
    assert scored.returncode == 0, scored.stderr[-2000:]
    assert 0 < json.loads(scored.stdout)["accuracy"] < 100


@pytest.mark.parametrize("args, extra, missing", [
    (("pretrain", "stage1", "--recipe", "tiny"), "train", "deepspeed"),
    (("finetune", "caption", "--recipe", "tiny", "--init", "runs/none"), "train", "deepspeed"),
    (("prepare", "capfilt", "shards/", "--out", "out/"), "data", "img2dataset"),
])
def test_a_command_that_needs_an_extra_names_it_in_one_line(base_python, tmp_path, args, extra, missing):
    proc = run(base_python, *args, cwd=tmp_path)
    assert proc.returncode == EXIT_BAD_INPUT
    assert proc.stderr.strip().splitlines() == [
        f"error: {' '.join(['blip2', *args[:1]]) if extra == 'train' else 'blip2 prepare capfilt'} needs {missing}, "
        f"which is not installed: pip install 'blip2[{extra}]'"]
    assert not list(tmp_path.iterdir())  # nothing was started
