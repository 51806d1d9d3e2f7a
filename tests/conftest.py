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


@pytest.fixture(scope="module")
def opt(hf_opt):
    """The tiny OPT model of ``hf_opt``, loaded in float32 on the CPU (once per test module)."""
    import blip2cli

    return blip2cli.load(str(hf_opt), device="cpu", dtype="float32")


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


@pytest.fixture(scope="session")
def trained_tiny(tmp_path_factory):
    """A directory with ``runs/tiny-stage2/latest``: a model blip2 itself trained, through the CLI, with the tiny
    recipes cut to two steps per stage.

    The tiny recipe's LLM is planted beforehand in ``runs/tiny-llm`` (stage 2 reuses one it finds there) with
    random but non-trivial weights, instead of the recipe's minutes of pretraining.
    """
    from pathlib import Path

    from transformers import OPTForCausalLM

    from blip2cli.models.tiny import pretrain_llm

    from .helpers import blip2

    work = tmp_path_factory.mktemp("trained-tiny-build")
    llm = pretrain_llm(["a red circle"], work / "runs" / "tiny-llm", steps=0)
    model = OPTForCausalLM.from_pretrained(llm)
    tiny._randomise(model, seed=5)
    model.save_pretrained(llm)
    steps = ["--set", "train.steps=2", "--set", "train.save_every=2"]
    one = blip2("pretrain", "stage1", "--recipe", "tiny", "--out", "runs", *steps, cwd=work)
    assert one.returncode == 0, one.stderr[-3000:]
    two = blip2("pretrain", "stage2", "--recipe", "tiny", "--init", "runs/tiny-stage1", "--out", "runs", *steps,
                cwd=work)
    assert two.returncode == 0, two.stderr[-3000:]
    root = Path(tmp_path_factory.getbasetemp()) / "blip2-trained-tiny"
    os.replace(work, root)
    return root
