"""DeepSpeed ZeRO-2 and ZeRO-3 on two CPU ranks (gloo): the same losses and gradients as one process
with the whole batch, and ``blip2 pretrain`` itself under the DeepSpeed launcher."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import BLIP2, REPO, blip2, cli_env, free_port
from tests.train.tiny_tasks import B, batch_for, forward_backward, task_for

DEEPSPEED = shutil.which("deepspeed", path=str(Path(sys.executable).parent)) or "deepspeed"
WORKER = REPO / "tests" / "ds_worker.py"


def launch(args: list[str], cwd: Path, timeout: int = 900) -> subprocess.CompletedProcess:
    """Run under the DeepSpeed launcher on two CPU ranks; on timeout the ranks are killed with it.

    Extensions go to a private directory, which must stay empty: nothing is compiled just in time.
    """
    extensions = cwd / "torch_extensions"
    env = cli_env({"DS_ACCELERATOR": "cpu", "PYTHONPATH": str(REPO), "TORCH_EXTENSIONS_DIR": str(extensions)},
                  threads=1)
    cmd = [DEEPSPEED, "--num_accelerators", "2", "--master_port", str(free_port()), *args]
    with subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          start_new_session=True) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            raise
    assert not extensions.exists() or not any(extensions.iterdir()), "an op was compiled just in time"
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


@pytest.fixture(scope="module")
def assets(tmp_path_factory, hf_opt):
    from tests import tiny

    root = tmp_path_factory.mktemp("ds")
    tiny.bert_tokenizer().save_pretrained(root / "bert")
    shutil.copytree(hf_opt, root / "opt")
    return root


@pytest.mark.distributed
@pytest.mark.parametrize("stage, zero", [("stage1", 2), ("stage1", 3), ("stage2", 2), ("stage2", 3), ("vqa", 2)])
def test_zero_two_ranks_equal_one_process(stage, zero, assets, tmp_path):
    """Losses and full gradients; ``vqa`` is a fine-tune with the ViT trained and a Q-Former reading the question."""
    proc = launch([str(WORKER), "--stage", stage, "--zero", str(zero), "--assets", str(assets), "--out",
                   str(tmp_path)], cwd=tmp_path)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    got = torch.load(tmp_path / f"zero{zero}.pt")
    task = task_for(stage, str(assets))
    losses, grads = forward_backward(task, batch_for(stage, 2 * B))
    for k in losses:
        torch.testing.assert_close(got["losses"][k], losses[k], atol=1e-5, rtol=1e-5, msg=k)
    assert {f"net.{k}" if not k.startswith("net.") else k for k in got["grads"]} == set(grads)
    for name, g in grads.items():
        other = got["grads"][name]
        assert (other - g).norm() <= 1e-5 * g.norm() + 1e-7, name


@pytest.mark.distributed
@pytest.mark.slow
def test_pretrain_under_the_deepspeed_launcher_saves_and_resumes(tmp_path):
    args = [BLIP2, "pretrain", "stage1", "--recipe", "tiny", "--out", "runs", "--name", "ds", "--set",
            "train.steps=4", "--set", "train.save_every=2", "--set", "train.zero_stage=3"]
    first = launch(args, cwd=tmp_path)
    assert first.returncode == 0, (first.stdout + first.stderr)[-4000:]
    run = tmp_path / "runs" / "ds"
    assert (run / "latest").resolve().name == "step-000004"
    assert (run / "step-000004" / "model.safetensors").exists()
    again = launch([*args, "--set", "train.steps=6"], cwd=tmp_path)
    assert again.returncode == 0, (again.stdout + again.stderr)[-4000:]
    assert "resumed from" in again.stdout + again.stderr
    assert (run / "latest").resolve().name == "step-000006"
    other = launch([*args, "--set", "train.steps=8", "--set", "train.zero_stage=2"], cwd=tmp_path)
    assert other.returncode != 0 and "written by the deepspeed-zero3 engine" in other.stdout + other.stderr
    import blip2cli

    model = blip2cli.load(str(run), device="cpu", dtype="float32")
    assert model.itc([_shape_image(tmp_path)], ["a red circle"]).shape == (1, 1)


def _shape_image(tmp_path: Path) -> Path:
    from blip2cli.data.synthetic import ShapesDataset

    return ShapesDataset("heldout", size=1).write_images(tmp_path / "img", 1)[0]


@pytest.mark.distributed
def test_pretrain_under_torchrun(tmp_path):
    proc = blip2("pretrain", "stage1", "--recipe", "tiny", "--out", "runs", "--name", "tr", "--set", "train.steps=2",
                 cwd=tmp_path, ranks=2, env={"DS_ACCELERATOR": "cpu"}, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    trainer = tmp_path / "runs" / "tr" / "latest" / "trainer"
    assert (trainer / "engine").is_dir()  # DeepSpeed's checkpoint: two ranks ran under ZeRO
    assert {p.name for p in trainer.glob("state-rank*")} == {"state-rank000.json", "state-rank001.json"}
