"""Session fixtures: tiny random BLIP-2 checkpoints in transformers' format, built offline."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

from . import tiny  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def hf_opt(tmp_path_factory):
    return tiny.make_hf_opt(tmp_path_factory.mktemp("hf") / "opt")


@pytest.fixture(scope="session")
def hf_t5(tmp_path_factory):
    return tiny.make_hf_t5(tmp_path_factory.mktemp("hf") / "t5")


@pytest.fixture(scope="session")
def hf_itm(tmp_path_factory):
    return tiny.make_hf_itm(tmp_path_factory.mktemp("hf") / "itm")


@pytest.fixture(scope="session")
def image_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    paths = []
    for i in range(5):
        p = root / f"img{i}.png"
        tiny.draw_image(i).save(p)
        paths.append(p)
    return paths


@pytest.fixture(scope="session")
def quickstart(tmp_path_factory):
    """The README's quickstart, each command run as written in a fresh directory with this environment's
    ``blip2``: ``.root`` is that directory, ``.results`` maps each command to its finished process."""
    import subprocess
    import sys
    from pathlib import Path
    from types import SimpleNamespace

    from . import readme

    root = tmp_path_factory.mktemp("quickstart")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "OMP_NUM_THREADS": "2"}
    results = {}
    for command in readme.commands("Quickstart"):
        proc = subprocess.run(["bash", "-c", command], cwd=root, env=env, capture_output=True, text=True,
                              timeout=1200)
        assert proc.returncode == 0, f"{command}\n{proc.stderr[-3000:]}"
        results[command] = proc
    return SimpleNamespace(root=root, results=results)
