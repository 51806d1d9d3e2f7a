"""Pretraining runs that never lie and never run strangers' code: verified checkpoints, resume that never
guesses, one writer per run directory, crash-safe metrics, checked recipes, and no overwriting of inputs."""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import sys
from pathlib import Path

import pytest
import torch

import blip2cli
from blip2cli.config import load_recipe
from blip2cli.runtime.errors import Blip2Error
from blip2cli import integrity
from blip2cli.runtime import rundir
from blip2cli.train import loop
from blip2cli.train.metrics import MetricsLog
from blip2cli.train.recipe import PretrainRecipe

from tests.helpers import blip2, free_port

RUN = ["pretrain", "stage1", "--recipe", "tiny", "--out", "runs", "--name", "r", "--set", "data.batch_size=4",
       "--set", "train.save_every=1", "--set", "train.log_every=1000"]


def main_in_process(args: list[str], cwd: Path, monkeypatch, capsys) -> tuple[int, str]:
    """``blip2 ARGS`` through the console script's own function, in this process (to patch a write)."""
    from blip2cli.cli.app import main

    monkeypatch.chdir(cwd)
    monkeypatch.setattr(sys, "argv", ["blip2", *args])
    capsys.readouterr()
    try:
        main()
        code = 0
    except SystemExit as e:
        code = e.code or 0
    return code, capsys.readouterr().err


def error_line(stderr: str) -> str:
    """The one ``error:`` line of a failed command (no traceback, nothing after it)."""
    assert "Traceback" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and stderr.rstrip().endswith(errors[0]), stderr[-2000:]
    return errors[0]


def steps_in_metrics(run: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def base_run(tmp_path_factory) -> Path:
    """A finished 2-step tiny run with checkpoints at steps 1 and 2, through the CLI."""
    root = tmp_path_factory.mktemp("base")
    proc = blip2(*RUN, "--set", "train.steps=2", cwd=root, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root / "runs" / "r"


@pytest.fixture
def run_copy(base_run, tmp_path) -> Path:
    shutil.copytree(base_run, tmp_path / "runs" / "r", symlinks=True)
    return tmp_path / "runs" / "r"


class Planted:
    """Pickled by ``torch.save``: reading it with a full unpickler would create ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def plant(path: Path, marker: Path) -> None:
    torch.save({"step": 2, "payload": Planted(marker)}, path)


# --------------------------------------------------------------------------- checkpoints run no code


def test_saved_checkpoints_verify_and_hold_no_pickled_state(base_run):
    for step in ("step-000001", "step-000002"):
        assert integrity.verify(base_run / step)
        manifest = json.loads((base_run / step / "manifest.json").read_text())
        assert manifest["step"] == int(step[-6:])
        assert {"model.safetensors", "blip2.json", "trainer/engine.pt", "trainer/state-rank000.json"} <= set(
            manifest["files"])
    assert not list(base_run.rglob("state-rank*.pt"))
    assert os.readlink(base_run / "latest") == "step-000002"
    with rundir.RunLock(base_run).acquire() as lock:  # the finished run released its lock
        assert lock is not None


def test_planted_pickle_in_engine_state_is_refused_through_the_cli(run_copy, tmp_path):
    marker = tmp_path / "pwned"
    plant(run_copy / "step-000002" / "trainer" / "engine.pt", marker)
    integrity.write_manifest(run_copy / "step-000002", 2)  # a consistent, deliberately crafted checkpoint
    proc = blip2(*RUN, "--set", "train.steps=3", cwd=tmp_path, timeout=900)
    assert proc.returncode == 2
    line = error_line(proc.stderr)
    assert "step-000002/trainer/engine.pt: refused to read it" in line and "(io.open)" in line
    assert not marker.exists()
    assert steps_in_metrics(run_copy) == [1, 2]  # nothing was started


def test_every_pickled_file_resume_reads_is_refused(run_copy, tmp_path):
    """engine.pt, and the trainer state of blip2 0.1 (a pickle): the scan, and the weights-only read itself."""
    marker = tmp_path / "pwned"
    trainer = run_copy / "step-000002" / "trainer"
    (trainer / "state-rank000.json").unlink()
    plant(trainer / "state-rank000.pt", marker)
    integrity.write_manifest(run_copy / "step-000002", 2)
    with pytest.raises(integrity.UnsafeCheckpoint, match="state-rank000.pt: refused to read it"):
        loop.choose_checkpoint(run_copy, "auto", overwrite=False)
    with pytest.raises(integrity.UnsafeCheckpoint, match="state-rank000.pt: refused"):
        loop.choose_checkpoint(run_copy, str(run_copy / "step-000002"), overwrite=False)
    for name in ("state-rank000.pt", "engine.pt"):
        plant(trainer / name, marker)
        with pytest.raises(integrity.UnsafeCheckpoint, match=f"{name}: refused to read it"):
            integrity.weights_only_load(trainer / name)
    assert not marker.exists()


# --------------------------------------------------------------------------- resume never guesses


def _fake_checkpoint(run: Path, step: int) -> Path:
    path = rundir.step_dir(run, step)
    (path / "trainer").mkdir(parents=True)
    (path / "trainer" / "state-rank000.json").write_text(json.dumps({"step": step}))
    (path / "model.safetensors").write_bytes(os.urandom(64))
    integrity.write_manifest(path, step)
    return path


def test_latest_in_each_form_and_broken(tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    two, four = _fake_checkpoint(run, 2), _fake_checkpoint(run, 4)
    assert loop.choose_checkpoint(run, "auto", False) == four  # no latest: the newest verified, said so
    assert f"{run / 'latest'} is missing; continuing from {four}" in capsys.readouterr().err
    rundir.point_latest(run, two)
    assert (run / "latest").is_symlink() and loop.choose_checkpoint(run, "auto", False) == two
    (run / "latest").unlink()
    (run / "latest").write_text("step-000004\n")  # the text form (DeepSpeed's, or where there are no symlinks)
    assert loop.choose_checkpoint(run, "auto", False) == four
    from blip2cli.models.resolve import resolve_path

    assert resolve_path(run) == four  # `blip2 generate --model RUN` reads the same form
    monkeypatch.setattr(Path, "symlink_to", lambda *a, **k: (_ for _ in ()).throw(OSError(errno.EPERM, "no")))
    rundir.point_latest(run, two)
    assert not (run / "latest").is_symlink() and (run / "latest").read_text() == "step-000002\n"
    monkeypatch.undo()

    (run / "latest").unlink()
    (run / "latest").symlink_to("step-000009")  # dangling
    capsys.readouterr()
    assert loop.choose_checkpoint(run, "auto", False) == four
    assert "names" in capsys.readouterr().err
    rundir.point_latest(run, four)
    with open(four / "model.safetensors", "r+b") as f:  # truncated
        f.truncate(10)
    assert loop.choose_checkpoint(run, "auto", False) == two
    warning = capsys.readouterr().err.strip()
    assert warning.count("\n") == 0 and "latest (step-000004) does not verify" in warning and str(two) in warning
    (two / "manifest.json").unlink()
    with pytest.raises(Blip2Error, match="no other checkpoint verifies .*no manifest.json") as e:
        loop.choose_checkpoint(run, "auto", False)
    assert "\n" not in str(e.value)
    with pytest.raises(Blip2Error, match="model.safetensors: 10 bytes, the manifest says 64"):
        loop.choose_checkpoint(run, str(four), False)
    assert loop.choose_checkpoint(tmp_path / "empty", "auto", False) is None


def test_truncated_checkpoint_falls_back_and_metrics_stay_one_row_per_step(run_copy, tmp_path):
    with open(run_copy / "step-000002" / "trainer" / "engine.pt", "r+b") as f:
        f.truncate(1000)
    with open(run_copy / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "lo')  # a torn last line
    proc = blip2(*RUN, "--set", "train.steps=2", cwd=tmp_path, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert ("warning: latest (step-000002) does not verify: runs/r/step-000002/trainer/engine.pt: 1000 bytes, the "
            "manifest says") in proc.stderr
    assert "continuing from runs/r/step-000001, the newest checkpoint that verifies" in proc.stderr
    assert "resumed from runs/r/step-000001 at step 1" in proc.stderr
    assert steps_in_metrics(run_copy) == [1, 2]
    assert os.readlink(run_copy / "latest") == "step-000002"
    assert all(integrity.verify(p) for p in rundir.step_dirs(run_copy))


def test_resume_never_refuses_existing_checkpoints_and_overwrite_starts_clean(run_copy, tmp_path, monkeypatch,
                                                                           capsys):
    code, err = main_in_process([*RUN, "--set", "train.steps=1", "--resume", "never"], tmp_path, monkeypatch, capsys)
    assert code == 2
    line = error_line(err)
    assert "runs/r already has checkpoints (step-000002, step-000001)" in line and "--overwrite" in line
    code, err = main_in_process([*RUN, "--set", "train.steps=1", "--resume", "never", "--overwrite"], tmp_path,
                                monkeypatch, capsys)
    assert code == 0, err[-2000:]
    assert "--overwrite: deleted latest, metrics.jsonl, command.txt, step-000002, step-000001" in err
    assert [p.name for p in rundir.step_dirs(run_copy)] == ["step-000001"]
    assert steps_in_metrics(run_copy) == [1]
    assert len((run_copy / "command.txt").read_text().splitlines()) == 1
    assert not [p for p in run_copy.iterdir() if p.name.startswith(".")]


# --------------------------------------------------------------------------- one writer per directory


def test_second_run_on_a_locked_directory_fails_at_once(tmp_path, monkeypatch, capsys):
    run = tmp_path / "runs" / "r"
    with rundir.RunLock(run).acquire():
        code, err = main_in_process([*RUN, "--set", "train.steps=2"], tmp_path, monkeypatch, capsys)
    assert code == 2
    line = error_line(err)
    assert f"runs/r is in use by PID {os.getpid()} on {socket.gethostname()} (lock runs/r/run.lock)" in line
    assert not (run / "recipe.yaml").exists()  # nothing was written


# --------------------------------------------------------------------------- failed saves and appends


def test_full_disk_during_a_save_keeps_the_last_checkpoint(tmp_path, monkeypatch, capsys):
    import safetensors.torch

    real = safetensors.torch.save_file
    calls = []

    def save_file(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == 2:  # the checkpoint of step 2: half a file, then a full disk
            Path(filename).write_bytes(b"\0" * 1000)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(filename))
        return real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", save_file)
    code, err = main_in_process([*RUN, "--set", "train.steps=2"], tmp_path, monkeypatch, capsys)
    assert code == 2
    line = error_line(err)
    assert ("saving the checkpoint of step 2 failed (runs/r/.step-000002.partial/model.safetensors: No space left on "
            "device); a checkpoint needs about") in line
    assert "in runs/r, which has" in line and "free; the partial checkpoint was removed and runs/r/step-000001 is " \
        "intact" in line
    run = tmp_path / "runs" / "r"
    assert [p.name for p in rundir.step_dirs(run)] == ["step-000001"] and not list(run.glob(".step-*"))
    assert os.readlink(run / "latest") == "step-000001" and integrity.verify(run / "step-000001")
    monkeypatch.undo()
    blip2cli.load(str(run / "latest"), device="cpu", dtype="float32")
    assert steps_in_metrics(run) == [1, 2]


def test_a_failed_append_leaves_no_torn_row(tmp_path, monkeypatch):
    log = MetricsLog(tmp_path, through_step=0)
    log.append({"step": 1, "loss": 1.0})
    real = os.write

    def half_then_full(fd, data):
        real(fd, bytes(data[: len(data) // 2]))
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "write", half_then_full)
    with pytest.raises(Blip2Error, match=r"metrics.jsonl: could not append the row of step 2 \(No space left"):
        log.append({"step": 2, "loss": 0.5})
    monkeypatch.undo()
    log.append({"step": 2, "loss": 0.5})
    log.close()
    assert steps_in_metrics(tmp_path) == [1, 2]


# --------------------------------------------------------------------------- recipes checked before anything runs


def test_float_fields_read_yaml_1_1_exponents():
    recipe = load_recipe(PretrainRecipe, "tiny/stage1", ["optim.lr=5e-4", "optim.min_lr=1e-6", "train.steps=2e3"])
    assert (recipe.optim.lr, recipe.optim.min_lr, recipe.train.steps) == (5e-4, 1e-6, 2000)
    assert isinstance(recipe.optim.lr, float)


@pytest.mark.parametrize("override, message", [
    ("optim.lr=0", "optim.lr 0.0: expected a finite number > 0"),
    ("optim.lr=-5e-4", "optim.lr -0.0005: expected a finite number > 0"),
    ("optim.lr=.nan", "optim.lr nan: expected a finite number > 0"),
    ("optim.lr=inf", "optim.lr inf: expected a finite number > 0"),
    ("optim.min_lr=-1e-6", "optim.min_lr -1e-06: expected a finite number >= 0"),
    ("optim.warmup_lr=-1", "optim.warmup_lr -1.0: expected a finite number >= 0"),
    ("optim.warmup_steps=-1", "optim.warmup_steps -1: expected an integer >= 0"),
    ("data.batch_size=0", "data.batch_size 0: expected an integer >= 1"),
    ("train.grad_accum=0", "train.grad_accum 0: expected an integer >= 1"),
    ("train.save_every=0", "train.save_every 0: expected an integer >= 1"),
    ("train.log_every=0", "train.log_every 0: expected an integer >= 1"),
    ("train.steps=0", "train.steps 0: expected an integer >= 1"),
    ("train.keep_last=0", "train.keep_last 0: expected an integer >= 1"),
    ("optim.lr=fast", "optim.lr: expected float, got 'fast'"),
])
def test_recipe_values_out_of_range_are_one_line(override, message):
    with pytest.raises(Blip2Error) as e:
        load_recipe(PretrainRecipe, "tiny/stage1", [override])
    assert str(e.value) == f"tiny/stage1.{message}"


def test_bad_values_stop_the_cli_before_anything_is_built(tmp_path, monkeypatch, capsys):
    code, err = main_in_process([*RUN, "--set", "optim.lr=5e-4", "--set", "train.steps=0"], tmp_path, monkeypatch,
                                capsys)
    assert code == 2
    assert error_line(err) == "error: tiny/stage1.train.steps 0: expected an integer >= 1"
    assert not (tmp_path / "runs").exists()


# --------------------------------------------------------------------------- no overwriting of what is read


def test_convert_refuses_an_output_that_overlaps_the_model(tmp_path, monkeypatch, capsys):
    model = tmp_path / "runs" / "r"
    (model / "step-000002").mkdir(parents=True)
    (model / "latest").symlink_to("step-000002")
    for out in ("runs/r", "runs/r/step-000002/hf", "runs", "runs/r/latest"):
        code, err = main_in_process(["convert", "runs/r/latest", "--out", out], tmp_path, monkeypatch, capsys)
        assert code == 2
        assert f"--out {out} overlaps the model runs/r/latest" in error_line(err)
    assert (model / "step-000002").is_dir()


def test_tiny_llm_directory_appears_whole_or_not_at_all(tmp_path, monkeypatch):
    from transformers import PreTrainedTokenizerFast

    from blip2cli.models import tiny

    out = tmp_path / "tiny-llm"

    def killed(self, *args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(PreTrainedTokenizerFast, "save_pretrained", killed)
        with pytest.raises(KeyboardInterrupt):
            tiny.pretrain_llm(["a red circle"], out, steps=1)
    assert list(tmp_path.iterdir()) == []
    tiny.pretrain_llm(["a red circle"], out, steps=1)
    assert (out / "config.json").stat().st_size > 0 and (out / "model.safetensors").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["tiny-llm"]


# --------------------------------------------------------------------------- DeepSpeed's checkpoint files


@pytest.mark.distributed
def test_deepspeed_checkpoints_are_read_weights_only(tmp_path):
    """A one-rank DeepSpeed run: its files load weights-only; a planted pickle in any of them is refused."""
    env = {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    args = [*RUN, "--set", "train.engine=deepspeed", "--set", "train.zero_stage=2", "--set", "train.steps=1"]
    proc = blip2(*args, cwd=tmp_path, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "runs" / "r"
    files = sorted((run / "step-000001" / "trainer" / "engine").glob("*.pt"))
    assert len(files) == 2 and integrity.verify(run / "step-000001")
    import deepspeed  # noqa: F401  (the engine's records are allowed once DeepSpeed runs)

    for f in files:
        integrity.weights_only_load(f)
    marker = tmp_path / "pwned"
    for f in files:
        saved = f.read_bytes()
        plant(f, marker)
        integrity.write_manifest(run / "step-000001", 1)
        with pytest.raises(integrity.UnsafeCheckpoint, match=f"{f.name}: refused to read it"):
            loop.choose_checkpoint(run, "auto", False)
        with pytest.raises(integrity.UnsafeCheckpoint, match=f"{f.name}: refused to read it"):
            integrity.weights_only_load(f)
        f.write_bytes(saved)
    plant(files[-1], marker)
    integrity.write_manifest(run / "step-000001", 1)
    again = blip2(*args[:-1], "train.steps=2", cwd=tmp_path, env=env, timeout=900)
    assert again.returncode == 2 and f"{files[-1].name}: refused to read it" in error_line(again.stderr)
    assert not marker.exists()
