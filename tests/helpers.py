"""Running ``blip2`` in the tests: the installed console script in a subprocess (``blip2``), the app in this
process (``invoke``), what their output must look like, and a free loopback port.

Plain functions, imported by the test modules and ``conftest.py`` (``from tests.helpers import blip2``).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Mapping

from blip2cli.runtime.errors import EXIT_BAD_INPUT

REPO = Path(__file__).resolve().parents[1]
BLIP2 = str(Path(sys.executable).with_name("blip2"))  # this environment's console scripts
TORCHRUN = str(Path(sys.executable).with_name("torchrun"))
FAST = ("--max-new-tokens", "4", "--device", "cpu")  # ``blip2 generate`` options that keep a tiny run short


def cli_env(env: Mapping[str, str] | None = None, *, threads: int = 2) -> dict[str, str]:
    """The environment ``blip2`` runs in: this process's, offline (``HF_HUB_OFFLINE=1``), ``threads`` OpenMP
    threads, then ``env`` over all of it (``{"HF_HOME": ...}`` for an empty cache, ``{"BLIP2_DEBUG": "1"}``)."""
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(threads), **(env or {})}


def blip2(*args: str | Path, cwd: str | Path | None = None, env: Mapping[str, str] | None = None,
          timeout: float = 600, ranks: int | None = None, text: bool = True,
          **run: object) -> subprocess.CompletedProcess:
    """``blip2 ARGS`` as users run it: the installed console script in a subprocess, in ``cwd``, with
    ``cli_env(env)``, stdout and stderr captured (as text unless ``text=False``), stdin empty.

    ``ranks``: under ``torchrun --standalone --nproc_per_node RANKS``, one OpenMP thread per rank unless ``env``
    says otherwise. ``timeout`` fails the test when the command hangs; other keywords go to ``subprocess.run``.
    """
    command = [BLIP2, *map(str, args)]
    if ranks:
        command = [TORCHRUN, "--standalone", "--nproc_per_node", str(ranks), *command]
    if "input" not in run:
        run.setdefault("stdin", subprocess.DEVNULL)  # a command never waits for a keyboard
    return subprocess.run(command, cwd=cwd, env=cli_env(env, threads=1 if ranks else 2), capture_output=True,
                          text=text, timeout=timeout, **run)


def invoke(*args: str | Path):
    """``blip2 ARGS`` in this process, through Typer's test runner on the ``blip2`` app (what a test needs to
    patch in-process); returns click's ``Result`` (``exit_code``, ``stdout``, ``exception``)."""
    from typer.testing import CliRunner

    from blip2cli.cli.app import app

    return CliRunner().invoke(app, [str(a) for a in args])


def in_process(*args: str | Path, cwd: str | Path | None = None) -> subprocess.CompletedProcess:
    """``blip2 ARGS`` through the console script's entry point (``blip2cli.cli.app.main``: its one-line errors and
    exit codes) in this process, in ``cwd``, stdout and stderr captured: ``blip2`` without the seconds a new
    interpreter spends importing torch and transformers, for tests whose subject is not the process itself."""
    import contextlib
    import io

    from blip2cli.cli.app import main

    out, err, argv, here = io.StringIO(), io.StringIO(), sys.argv, os.getcwd()
    code: int | str | None = 0
    try:
        os.chdir(cwd or here)
        sys.argv = ["blip2", *map(str, args)]
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            main()
    except SystemExit as e:
        code = e.code
    finally:
        sys.argv = argv
        os.chdir(here)
    code = code if isinstance(code, int) else 1 if code else 0
    return subprocess.CompletedProcess(["blip2", *map(str, args)], code, out.getvalue(), err.getvalue())


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (at the time of asking)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def records(proc: subprocess.CompletedProcess) -> list[dict]:
    """The JSON lines of a command's stdout (``--json``)."""
    return [json.loads(line) for line in proc.stdout.splitlines()]


def error_lines(proc: subprocess.CompletedProcess) -> list[str]:
    """The non-blank lines of stderr, each of which must be an ``error: ...`` line (no traceback)."""
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert all(line.startswith("error: ") for line in lines), proc.stderr
    return lines


def assert_one_line_error(proc: subprocess.CompletedProcess, *fragments: str,
                          code: int | None = EXIT_BAD_INPUT) -> None:
    """The command failed with exit status ``code`` (``None``: any but 0), one ``error:`` line holding every
    fragment on stderr, and nothing on stdout."""
    if code is None:
        assert proc.returncode != 0, proc.stderr
    else:
        assert proc.returncode == code, proc.stderr
    lines = error_lines(proc)
    assert len(lines) == 1, proc.stderr
    assert all(fragment in lines[0] for fragment in fragments), lines[0]
    assert proc.stdout == ""


def recipe_schema(name: str):
    """The dataclass a recipe reads into, or None for the DeepSpeed presets (plain mappings)."""
    from blip2cli.api import Decoding
    from blip2cli.data.capfilt import CapFiltRecipe
    from blip2cli.data.download import DownloadRecipe
    from blip2cli.eval.generation import GenerationEval
    from blip2cli.eval.retrieval import RetrievalEval
    from blip2cli.train.recipe import PretrainRecipe

    group, stem = name.split("/", 1)
    return {
        "pretrain": PretrainRecipe,
        "finetune": PretrainRecipe,
        "tiny": PretrainRecipe,
        "generate": Decoding,
        "eval": RetrievalEval if stem in ("flickr30k", "coco-retrieval") else GenerationEval,
        "prepare": CapFiltRecipe if stem == "capfilt" else DownloadRecipe,
        "deepspeed": None,
    }[group]


def straight_and_killed_runs(args: list[str], cwd: Path, first_checkpoint: str,
                             timeout: float = 900) -> tuple[Path, Path]:
    """``blip2 ARGS`` (a run writing to ``cwd/runs``) once straight through as ``--name straight``, and once as
    ``--name killed``: SIGKILLed as soon as its first checkpoint (``first_checkpoint``, e.g. ``step-000020``) is
    written, then rerun to the end, continuing from that checkpoint. Returns the two run directories."""
    import signal
    import time

    straight = blip2(*args, "--name", "straight", cwd=cwd, timeout=timeout)
    assert straight.returncode == 0, straight.stderr[-2000:]
    proc = subprocess.Popen([BLIP2, *args, "--name", "killed"], cwd=cwd, env=cli_env(), stderr=subprocess.DEVNULL)
    run = Path(cwd) / "runs" / "killed"
    deadline = time.time() + 600
    while not (run / "latest").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (run / "latest").resolve().name == first_checkpoint
    resumed = blip2(*args, "--name", "killed", "--resume", "auto", cwd=cwd, timeout=timeout)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stderr
    return Path(cwd) / "runs" / "straight", run


def tensorboard_scalars(logdir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar tag of a TensorBoard log directory as TensorBoard shows it: ``tag -> [(step, value)]``, events
    an earlier start wrote after a later start's ``purge_step`` left out."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(logdir), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def wandb_offline_history(run_dir: Path) -> list[tuple[str, dict]]:
    """The history rows of every offline W&B run under ``run_dir/wandb`` (one ``offline-run-*`` folder per start),
    in the order written: ``[(run id, {"_step": ..., key: value})]``, read from the ``.wandb`` files W&B syncs
    (a log of 32 KiB blocks of checksummed chunks, each record a ``wandb_internal_pb2.Record``)."""
    import struct

    from wandb.proto import wandb_internal_pb2

    rows = []
    for path in sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb")):
        data = path.read_bytes()
        assert data[:4] == b":W&B", path
        pos, block, pending = 7, 32768, b""
        while pos + 7 <= len(data):
            left = block - pos % block
            _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
            if left < 7 or (length == 0 and kind == 0):  # the zero-filled end of a block
                pos += left
                continue
            chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
            pending = chunk if kind in (1, 2) else pending + chunk  # full, first, middle, last
            if kind not in (1, 4):
                continue
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            if record.WhichOneof("record_type") == "history":
                rows.append((path.stem.removeprefix("run-"),
                             {item.key or "/".join(item.nested_key): json.loads(item.value_json)
                              for item in record.history.item}))
    return rows
