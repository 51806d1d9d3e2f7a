"""DeepSpeed ZeRO-2 and ZeRO-3 on two CPU ranks (gloo): the same losses and gradients as one process
with the whole batch, and ``blip2 pretrain`` itself under the DeepSpeed launcher."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.helpers import BLIP2, REPO, TORCHRUN, cli_env, free_port, tensorboard_scalars
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
@pytest.mark.parametrize("stage, zero", [("stage1", 3), ("stage2", 2), ("stage2", 3), ("vqa", 2)])
def test_zero_two_ranks_equal_one_process(stage, zero, assets, tmp_path):
    """Losses and full gradients; ``vqa`` is a fine-tune with the ViT trained and a Q-Former reading the question.
    (Stage 1 under ZeRO-2: ``test_two_nodes_on_loopback_equal_one_process``.)"""
    proc = launch([str(WORKER), "--stage", stage, "--zero", str(zero), "--assets", str(assets), "--out",
                   str(tmp_path)], cwd=tmp_path)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert_as_one_process(stage, torch.load(tmp_path / f"zero{zero}.pt"), assets)


def assert_as_one_process(stage: str, got: dict, assets: Path) -> None:
    """``got`` (what ``ds_worker.py`` saved from two ranks of batch B) equals one process with batch 2 x B."""
    task = task_for(stage, str(assets))
    losses, grads = forward_backward(task, batch_for(stage, 2 * B))
    for k in losses:
        torch.testing.assert_close(got["losses"][k], losses[k].float(), atol=1e-5, rtol=1e-5, msg=k)
    assert {f"net.{k}" if not k.startswith("net.") else k for k in got["grads"]} == set(grads)
    for name, g in grads.items():
        other = got["grads"][name]
        assert (other - g).norm() <= 1e-5 * g.norm() + 1e-7, name


@pytest.mark.distributed
def test_two_nodes_on_loopback_equal_one_process(assets, tmp_path):
    """Two nodes as the README launches them: two ``torchrun --nnodes 2`` processes (one rank each, as on two
    machines) meeting at a c10d rendezvous on 127.0.0.1, training under ZeRO-2."""
    port = free_port()
    command = [TORCHRUN, "--nnodes", "2", "--nproc_per_node", "1", "--rdzv_backend", "c10d", "--rdzv_endpoint",
               f"127.0.0.1:{port}", "--rdzv_id", "two-nodes", "--local_addr", "127.0.0.1", str(WORKER),
               "--stage", "stage1", "--zero", "2", "--assets", str(assets), "--out", str(tmp_path)]
    env = cli_env({"DS_ACCELERATOR": "cpu", "PYTHONPATH": str(REPO),
                   "TORCH_EXTENSIONS_DIR": str(tmp_path / "torch_extensions")}, threads=1)
    nodes = [subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, start_new_session=True) for _ in range(2)]
    outputs = []
    try:
        for node in nodes:
            outputs.append(node.communicate(timeout=900))
    finally:
        for node in nodes:
            if node.poll() is None:
                os.killpg(node.pid, signal.SIGKILL)
    for node, (out, err) in zip(nodes, outputs):
        assert node.returncode == 0, (out + err)[-4000:]
    assert_as_one_process("stage1", torch.load(tmp_path / "zero2.pt"), assets)


@pytest.mark.distributed
@pytest.mark.slow
def test_pretrain_under_the_deepspeed_launcher_saves_and_refuses_another_engine(tmp_path):
    args = [BLIP2, "pretrain", "stage1", "--recipe", "tiny", "--out", "runs", "--name", "ds", "--set",
            "train.steps=4", "--set", "train.save_every=2", "--set", "train.zero_stage=3"]
    first = launch(args, cwd=tmp_path)
    assert first.returncode == 0, (first.stdout + first.stderr)[-4000:]
    run = tmp_path / "runs" / "ds"
    assert (run / "latest").resolve().name == "step-000004"
    assert (run / "step-000004" / "model.safetensors").exists()
    # (a resume under ZeRO-3 on two ranks: test_the_slurm_example_requeues_at_the_time_limit_and_the_next_job_continues)
    other = launch([*args, "--set", "train.steps=8", "--set", "train.zero_stage=2"], cwd=tmp_path)
    assert other.returncode != 0 and "written by the deepspeed-zero3 engine" in other.stdout + other.stderr
    import blip2cli

    model = blip2cli.load(str(run), device="cpu", dtype="float32")
    assert model.itc([_shape_image(tmp_path)], ["a red circle"]).shape == (1, 1)


def _shape_image(tmp_path: Path) -> Path:
    from blip2cli.data.synthetic import ShapesDataset

    return ShapesDataset("heldout", size=1).write_images(tmp_path / "img", 1)[0]


FAKE_SLURM = {
    # the job's tasks, two "nodes" of one task each, here on this machine; their PIDs go to ./tasks
    "srun": """while [[ "$1" == -* ]]; do shift; done
pids=()
for i in 0 1; do
    SLURM_PROCID=$i SLURM_LOCALID=0 SLURM_NTASKS=2 "$@" &
    pids+=($!); echo $! >> tasks
done
status=0
for p in "${pids[@]}"; do wait "$p"; s=$?; (( s > status )) && status=$s; done
exit $status
""",
    "scontrol": """case "$1" in show) printf '127.0.0.1\\n127.0.0.1\\n';; requeue) echo "$2" >> requeued;; esac
""",
}


@pytest.mark.distributed
@pytest.mark.slow
def test_the_slurm_example_requeues_at_the_time_limit_and_the_next_job_continues(tmp_path):
    """``examples/slurm/blip2.sbatch`` as a two-node job, with ``srun`` and ``scontrol`` standing in for Slurm's:
    SIGTERM to every task (Slurm's ``--signal``) saves a checkpoint, the job exits 75 and requeues itself, and
    the requeued job continues the run."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in FAKE_SLURM.items():
        (bin_dir / name).write_text("#!/bin/bash\n" + body)
        (bin_dir / name).chmod(0o755)
    env = cli_env({"PATH": f"{bin_dir}:{Path(sys.executable).parent}:{os.environ['PATH']}",
                   "SLURM_JOB_NODELIST": "node[1-2]", "SLURM_JOB_ID": "4242", "MASTER_PORT": str(free_port()),
                   "DS_ACCELERATOR": "cpu"}, threads=1)
    job = ["bash", str(REPO / "examples" / "slurm" / "blip2.sbatch"), "pretrain", "stage1", "--recipe", "tiny",
           "--out", "runs", "--name", "slurm", "--set", "train.save_every=100000", "--set", "train.zero_stage=3",
           "--set", "train.loggers=[tensorboard]"]
    first = subprocess.Popen([*job, "--set", "train.steps=100000"], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, start_new_session=True)
    metrics = tmp_path / "runs" / "slurm" / "metrics.jsonl"
    try:
        deadline = time.time() + 600
        while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2) and time.time() < deadline:
            time.sleep(0.1)
        for pid in (tmp_path / "tasks").read_text().split():
            os.kill(int(pid), signal.SIGTERM)
        out, err = first.communicate(timeout=600)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
    assert first.returncode == 75, (out + err)[-4000:]
    assert (tmp_path / "requeued").read_text().split() == ["4242"]
    trainer = tmp_path / "runs" / "slurm" / "latest" / "trainer"
    assert (trainer / "engine").is_dir()  # DeepSpeed's checkpoint: two ranks ran under ZeRO
    assert {p.name for p in trainer.glob("state-rank*")} == {"state-rank000.json", "state-rank001.json"}
    step = int((tmp_path / "runs" / "slurm" / "latest").resolve().name.split("-")[1])

    again = subprocess.run([*job, "--set", f"train.steps={step + 2}"], cwd=tmp_path, env=env, capture_output=True,
                           text=True, timeout=900)
    assert again.returncode == 0, (again.stdout + again.stderr)[-4000:]
    assert f"resumed from runs/slurm/step-{step:06d} at step {step}" in again.stderr
    assert (tmp_path / "runs" / "slurm" / "latest").resolve().name == f"step-{step + 2:06d}"
    assert (tmp_path / "requeued").read_text().split() == ["4242"]  # finished: not requeued again
    # rank 0 alone logs: one event file per job, and each step once
    assert len(list((tmp_path / "runs" / "slurm" / "tensorboard").glob("events.out.tfevents.*"))) == 2
    logged = [s for s, _ in tensorboard_scalars(tmp_path / "runs" / "slurm" / "tensorboard")["train/loss"]]
    assert logged == list(range(1, step + 3))
