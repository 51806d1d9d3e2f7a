"""An eval run directory is bound to what made its work: model, decoding, dtype and inputs (``provenance.json``).

Everything runs through ``blip2``'s entry point (in this process: what is tested is the run directory, not the
process) on tiny models saved as blip2 training runs (``step-000400`` with its manifest, and ``latest``).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

import blip2cli
from blip2cli.eval import vqa_scoring
from blip2cli.models.formats import native
from blip2cli import integrity
from blip2cli.runtime import rundir

from tests import tiny
from tests.helpers import in_process

QUESTIONS = ["what is on the table?", "what colour is the sky?", "how many dogs are there?", "is it a circle?",
             "what is the man riding?"]
SMALL = ["--set", "batch_size=2", "--set", "max_new_tokens=3", "--set", "num_beams=2"]


def one_error(proc: subprocess.CompletedProcess) -> str:
    """The single ``error: ...`` line of a command that exited 2."""
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-3000:]
    return lines[0]


def training_run(run: Path, model_dir: Path, step: int = 400) -> Path:
    """``run/step-NNNNNN`` as a finished training save writes it (model, manifest last), and ``latest``."""
    model = blip2cli.load(str(model_dir), device="cpu", dtype="float32")
    path = rundir.step_dir(run, step)
    native.save(model.checkpoint, path)
    integrity.write_manifest(path, step)
    rundir.point_latest(run, path)
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory, hf_opt, hf_t5):
    """Two different models saved by training runs of the same name in two places: x (OPT) and y (Flan-T5)."""
    root = tmp_path_factory.mktemp("trained")
    return {"x": training_run(root / "x" / "runs" / "stage2", hf_opt),
            "y": training_run(root / "y" / "runs" / "stage2", hf_t5)}


@pytest.fixture
def bench(tmp_path):
    """Five VQA questions on three COCO-named images; every annotator answered "zebra"."""
    images = tmp_path / "coco" / "val2014"
    images.mkdir(parents=True)
    for image_id in (1, 2, 3):
        tiny.draw_image(image_id).save(images / f"COCO_val2014_{image_id:012d}.jpg")
    questions = [{"image_id": 1 + i % 3, "question": q, "question_id": 100 + i} for i, q in enumerate(QUESTIONS)]
    (tmp_path / "q.json").write_text(json.dumps({"questions": questions}))
    write_annotations(tmp_path, ["zebra"] * len(QUESTIONS))
    return tmp_path


def write_annotations(root: Path, answers: list[str]) -> None:
    """All ten annotators of question ``100 + i`` answered ``answers[i]``."""
    (root / "a.json").write_text(json.dumps({"annotations": [
        {"question_id": 100 + i, "image_id": 1 + i % 3, "answer_type": "other", "question_type": "what",
         "answers": [{"answer": answer, "answer_id": k + 1} for k in range(10)]} for i, answer in enumerate(answers)]}))


def eval_vqa(root: Path, model: Path | str, *extra: str) -> subprocess.CompletedProcess:
    return in_process("eval", "vqav2", "--model", str(model), "--images", "coco", "--questions", "q.json",
                 "--annotations", "a.json", "--device", "cpu", "--json", *SMALL, *extra, cwd=root)


def answers(run_dir: Path) -> list[str]:
    return [p["answer"] for p in json.loads((run_dir / "predictions.json").read_text())]


def expected_accuracy(root: Path, run_dir: Path) -> float:
    """The official accuracy of the predictions ``run_dir`` holds."""
    preds = json.loads((run_dir / "predictions.json").read_text())
    anns, qs = json.loads((root / "a.json").read_text()), json.loads((root / "q.json").read_text())
    return vqa_scoring.score_vqa(preds, anns, qs)["accuracy"]


def test_a_rerun_with_another_model_refuses_and_overwrite_predicts_again(bench, runs):
    x_latest, y_latest = runs["x"].parent / "latest", runs["y"].parent / "latest"
    first = eval_vqa(bench, x_latest, "--name", "v")
    assert first.returncode == 0, first.stderr[-3000:]
    run_dir = bench / "runs" / "v"
    said_by_x = answers(run_dir)
    provenance = json.loads((run_dir / "provenance.json").read_text())["made_by"]
    assert provenance["model"]["source"] == str(runs["x"].resolve())
    assert provenance["settings"]["num_beams"] == 2 and provenance["dtype"] == "float32"
    assert provenance["inputs"]["questions"] == {"path": str((bench / "q.json").resolve()),
                                                 "size": (bench / "q.json").stat().st_size}
    write_annotations(bench, said_by_x)  # scoring only: x now answers every question right

    # the same model resumes: a prediction lost to a kill is made again, the others are kept
    shard = run_dir / "predictions.rank000.jsonl"
    lines = shard.read_text().splitlines()
    shard.write_text("\n".join(lines[:-1]) + "\n")
    again = eval_vqa(bench, x_latest, "--name", "v")
    assert again.returncode == 0, again.stderr[-3000:]
    assert shard.read_text().splitlines()[:-1] == lines[:-1] and len(shard.read_text().splitlines()) == len(lines)
    assert answers(run_dir) == said_by_x and json.loads(again.stdout)["accuracy"] == 100.0

    # another model on the same run directory: refused, naming both, and nothing is touched
    line = one_error(eval_vqa(bench, y_latest, "--name", "v"))
    assert line.startswith(f"error: runs/v holds predictions of {runs['x'].resolve()} (weights "
                           f"{provenance['model']['weights'][:8]}…); this run uses {runs['y'].resolve()} (weights ")
    assert line.endswith("…): choose another --name, or add --overwrite to discard them")
    assert answers(run_dir) == said_by_x

    # --overwrite discards x's predictions: y's own are made and scored
    replaced = eval_vqa(bench, y_latest, "--name", "v", "--overwrite")
    assert replaced.returncode == 0, replaced.stderr[-3000:]
    assert "--overwrite: discarded" in replaced.stderr
    said_by_y = answers(run_dir)
    assert said_by_y != said_by_x
    score = json.loads(replaced.stdout)["accuracy"]
    assert score == expected_accuracy(bench, run_dir) < 100.0
    assert json.loads((run_dir / "provenance.json").read_text())["made_by"]["model"]["source"] == \
        str(runs["y"].resolve())
    assert json.loads((run_dir / "results.json").read_text())["accuracy"] == score


def test_other_decoding_or_inputs_refuse_with_what_differs(bench, hf_opt):
    assert eval_vqa(bench, hf_opt, "--name", "v").returncode == 0
    line = one_error(eval_vqa(bench, hf_opt, "--name", "v", "--set", "num_beams=3"))
    assert line == ("error: runs/v holds predictions made with num_beams=2; this run uses num_beams=3: choose "
                    "another --name, or add --overwrite to discard them")
    questions = json.loads((bench / "q.json").read_text())
    questions["questions"] = questions["questions"][:4]
    (bench / "q.json").write_text(json.dumps(questions))
    line = one_error(eval_vqa(bench, hf_opt, "--name", "v"))
    assert f"holds predictions made with questions={(bench / 'q.json').resolve()} (" in line
    assert "this run uses questions=" in line
    (bench / "runs" / "v" / "provenance.json").unlink()
    line = one_error(eval_vqa(bench, hf_opt, "--name", "v"))
    assert "runs/v holds predictions of unknown origin (no provenance.json" in line and "--overwrite" in line


def test_default_run_names_never_mix_two_models(bench, runs):
    x_latest, y_latest = runs["x"].parent / "latest", runs["y"].parent / "latest"
    y_text = bench / "copy" / "stage2"  # y again, its latest in the text form
    shutil.copytree(runs["y"].parent, y_text, symlinks=True)
    (y_text / "latest").unlink()
    (y_text / "latest").write_text("step-000400\n")

    x_run = eval_vqa(bench, x_latest)
    assert x_run.returncode == 0, x_run.stderr[-3000:]
    assert "predictions and results: runs/vqav2-stage2-step-000400\n" in x_run.stderr
    y_run = eval_vqa(bench, y_latest)  # same run name, same step, another model: never x's directory
    assert y_run.returncode == 0, y_run.stderr[-3000:]
    y_dirs = [p for p in (bench / "runs").iterdir() if p.name.startswith("vqav2-stage2-step-000400-")]
    assert len(y_dirs) == 1 and len(y_dirs[0].name) == len("vqav2-stage2-step-000400-") + 8
    assert json.loads(y_run.stdout)["accuracy"] == expected_accuracy(bench, y_dirs[0])
    assert answers(y_dirs[0]) != answers(bench / "runs" / "vqav2-stage2-step-000400")

    for model, where in ((x_latest, "vqav2-stage2-step-000400"), (y_latest, y_dirs[0].name)):
        rerun = eval_vqa(bench, model)  # each model finds its own directory again
        assert rerun.returncode == 0 and f"predictions and results: runs/{where}\n" in rerun.stderr
    copy_run = eval_vqa(bench, y_text / "latest")  # the text form resolves; another path: another run
    assert copy_run.returncode == 0, copy_run.stderr[-3000:]
    made_by = json.loads(next((bench / "runs").glob("vqav2-stage2-step-000400-*/provenance.json")).read_text())
    assert made_by["made_by"]["model"]["weights_from"] == "manifest"
    assert len(list((bench / "runs").iterdir())) == 3


def test_a_truncated_checkpoint_behind_latest_is_one_line(tmp_path, runs, image_files, bench):
    run = tmp_path / "runs" / "x"
    shutil.copytree(runs["x"].parent, run, symlinks=True)
    (run / "latest").unlink()
    (run / "latest").write_text("step-000400\n")  # the text form
    ok = in_process("generate", str(image_files[0]), "--model", "runs/x/latest", "--device", "cpu", cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr[-3000:]
    weights = run / "step-000400" / "model.safetensors"
    with open(weights, "r+b") as f:
        f.truncate(weights.stat().st_size // 2)
    line = one_error(in_process("generate", str(image_files[0]), "--model", "runs/x/latest", "--device", "cpu",
                           cwd=tmp_path))
    assert line.startswith("error: runs/x/step-000400/model.safetensors: ")
    assert "the manifest says" in line
    line = one_error(eval_vqa(bench, run / "latest", "--name", "t"))
    assert f"{run / 'step-000400' / 'model.safetensors'}: " in line and "the manifest says" in line
    (run / "latest").write_text("step-000009\n")
    line = one_error(in_process("generate", str(image_files[0]), "--model", "runs/x", "--device", "cpu", cwd=tmp_path))
    assert line == "error: runs/x/latest names runs/x/step-000009, which is not a directory: there is no checkpoint " \
                   "to load"


def test_retrieval_scores_are_bound_to_their_model(tmp_path, hf_itm):
    images = tmp_path / "images"
    images.mkdir()
    split = []
    for i in range(4):
        tiny.draw_image(i).save(images / f"{i}.jpg")
        split.append({"image": f"{i}.jpg", "caption": [tiny.CORPUS[i], tiny.CORPUS[i + 1]]})
    (tmp_path / "test.json").write_text(json.dumps(split))
    other = tmp_path / "itm-copy"
    shutil.copytree(hf_itm, other)
    args = ["eval", "flickr30k", "--images", "images", "--annotations", "test.json", "--k", "3", "--device", "cpu",
            "--json", "--name", "f"]
    first = in_process(*args, "--model", str(hf_itm), cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    assert (tmp_path / "runs" / "f" / "itc.pt").exists()
    line = one_error(in_process(*args, "--model", str(other), cwd=tmp_path))
    assert line.startswith(f"error: runs/f holds retrieval scores of {Path(hf_itm).resolve()} (weights ")
    assert f"this run uses {other.resolve()} (weights " in line
    replaced = in_process(*args, "--model", str(other), "--overwrite", cwd=tmp_path)
    assert replaced.returncode == 0, replaced.stderr[-3000:]
    assert json.loads(replaced.stdout) == json.loads(first.stdout)  # the same weights, copied: the same scores
    made_by = json.loads((tmp_path / "runs" / "f" / "provenance.json").read_text())["made_by"]
    assert made_by["model"]["source"] == str(other.resolve()) and made_by["settings"] == {"k": 3}


def test_a_second_eval_on_a_directory_in_use_stops_at_once(bench, runs):
    with rundir.RunLock(bench / "runs" / "v"):
        proc = eval_vqa(bench, runs["x"].parent / "latest", "--name", "v")
    line = one_error(proc)
    assert f"PID {os.getpid()}" in line and "is in use" in line
    assert not (bench / "runs" / "v" / "provenance.json").exists()
    again = eval_vqa(bench, runs["x"].parent / "latest", "--name", "v")  # the lock went with its holder
    assert again.returncode == 0, again.stderr[-3000:]
