"""The command lines of DESIGN.md's "Who uses it", typed as users type them, through the real ``blip2``.

Offline there are no EVA/OPT/Flan-T5 weights, no LAION data and no benchmark images: each line must reach
its real work and stop at the first missing piece with one error line that names it and says how to get it.
With tiny data at the default places, the lines run to the end.
"""

from __future__ import annotations

import io
import json
import subprocess
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from blip2cli.config import load_recipe, recipes_root
from blip2cli.data import annotations
from blip2cli.eval.generation import GenerationEval
from blip2cli.eval.retrieval import RetrievalEval

from tests import tiny
from tests.helpers import blip2, in_process

PRETRAINING_DIRS = ["data/laion115m-capfilt", "data/cc12m-capfilt", "data/cc3m-capfilt", "data/sbu-capfilt",
                    "data/coco/shards", "data/vg/shards"]
QUESTIONS = ["what is on the table?", "what colour is the sky?", "how many dogs are there?", "is it a circle?",
             "what is the man riding?"]
SMALL = ["--set", "batch_size=2", "--set", "max_new_tokens=3", "--set", "num_beams=2"]


@pytest.fixture(autouse=True)
def as_a_user(tmp_path, monkeypatch):
    """Each command runs (in ``tmp_path``) as a user's would with nothing downloaded yet: offline, blip2's own
    download cache empty (``BLIP2_CACHE`` under ``tmp_path``), help printed wide enough to show whole names."""
    monkeypatch.setenv("BLIP2_OFFLINE", "1")
    monkeypatch.setenv("BLIP2_CACHE", str(tmp_path / ".cache" / "blip2"))
    monkeypatch.setenv("COLUMNS", "250")


def one_error(proc: subprocess.CompletedProcess, code: int = 2) -> str:
    """The single ``error: ...`` line of a failed command (no traceback, nothing on stdout)."""
    assert proc.returncode == code, (proc.returncode, proc.stderr[-3000:])
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-3000:]
    assert proc.stdout == ""
    return lines[0]


# --- blip2 pretrain stage1 --vit ... / stage2 --llm ... -----------------------------------------------


def write_shard(directory: Path) -> None:
    """One webdataset shard with one image-caption sample, as ``blip2 prepare`` writes them."""
    directory.mkdir(parents=True, exist_ok=True)
    image = io.BytesIO()
    tiny.draw_image(0).save(image, format="JPEG")
    with tarfile.open(directory / "00000.tar", "w") as tar:
        for name, data in (("000000000.jpg", image.getvalue()), ("000000000.txt", b"a red circle")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


@pytest.mark.parametrize("args", [["stage1", "--vit", "eva-g"], ["stage1", "--vit", "clip-l"],
                                  *(["stage2", "--llm", llm, "--init", "runs/stage1/latest"]
                                    for llm in ("opt-2.7b", "opt-6.7b", "flant5-xl", "flant5-xxl"))])
def test_pretrain_line_without_data_names_it_and_the_prepare_commands(tmp_path, args):
    message = one_error(in_process("pretrain", *args, cwd=tmp_path))
    stage, name = args[0], args[2]
    assert message.startswith(f"error: recipe pretrain/{stage}_{name} reads data that is not here: ")
    for directory in PRETRAINING_DIRS:
        assert directory in message
    assert "`blip2 prepare laion --subset 115m`, then `blip2 prepare capfilt data/laion115m --out " \
           "data/laion115m-capfilt`" in message
    assert "`blip2 prepare coco --shards`" in message
    assert not (tmp_path / "runs").exists()  # stopped before anything was built or written


def test_the_prepare_commands_named_make_the_directories_the_recipes_read():
    from blip2cli.data.download import DownloadRecipe
    from blip2cli.train.recipe import PretrainRecipe

    for path in sorted((recipes_root() / "pretrain").glob("*.yaml")):
        sources = load_recipe(PretrainRecipe, f"pretrain/{path.stem}").data.sources
        assert {s.path for s in sources} == set(PRETRAINING_DIRS)
    made = {load_recipe(DownloadRecipe, f"prepare/{s}").pretraining_dir for s in ("laion", "cc12m", "cc3m", "sbu",
                                                                                 "coco", "vg")}
    assert made == set(PRETRAINING_DIRS)
    laion = load_recipe(DownloadRecipe, "prepare/laion")
    assert laion.pretraining_steps[0] == "blip2 prepare laion --subset 115m"  # writes data/laion115m


def test_unknown_tower_or_llm_lists_the_choices(tmp_path):
    assert one_error(in_process("pretrain", "stage1", "--vit", "vit-h", cwd=tmp_path)) == \
        "error: --vit 'vit-h': choose clip-l, eva-g (or --recipe FILE for another)"
    assert one_error(in_process("pretrain", "stage2", "--llm", "llama-7b", cwd=tmp_path)) == \
        "error: --llm 'llama-7b': choose flant5-xl, flant5-xxl, opt-2.7b, opt-6.7b (or --recipe FILE for another)"


def test_recipe_wins_and_must_agree_with_vit_or_llm(tmp_path):
    message = one_error(in_process("pretrain", "stage1", "--vit", "clip-l", "--recipe", "pretrain/stage1_eva-g",
                              cwd=tmp_path))
    assert "--vit clip-l disagrees with recipe pretrain/stage1_eva-g" in message and "model.vision eva-g" in message
    message = one_error(in_process("pretrain", "stage2", "--llm", "flant5-xl", "--recipe", "tiny", cwd=tmp_path))
    assert "--llm flant5-xl disagrees with recipe tiny/stage2" in message
    agreeing = one_error(in_process("pretrain", "stage1", "--vit", "eva-g", "--recipe", "pretrain/stage1_eva-g",
                               cwd=tmp_path))
    assert agreeing.startswith("error: recipe pretrain/stage1_eva-g reads data that is not here")


def test_each_stage_help_names_its_own_recipes(tmp_path):
    one = in_process("pretrain", "stage1", "--help", cwd=tmp_path)
    two = in_process("pretrain", "stage2", "--help", cwd=tmp_path)
    assert one.returncode == 0 and two.returncode == 0
    for name in ("pretrain/stage1_eva-g", "pretrain/stage1_clip-l", "tiny/stage1", "--vit"):
        assert name in one.stdout and name not in two.stdout
    for name in ("pretrain/stage2_opt-2.7b", "pretrain/stage2_opt-6.7b", "pretrain/stage2_flant5-xl",
                 "pretrain/stage2_flant5-xxl", "tiny/stage2", "--llm"):
        assert name in two.stdout and name not in one.stdout


@pytest.fixture
def pretraining_data(tmp_path):
    """Every directory the paper's recipes read, each with a shard; and an empty Hugging Face cache."""
    for directory in PRETRAINING_DIRS:
        write_shard(tmp_path / directory)
    (tmp_path / "hf").mkdir()
    return tmp_path


def test_stage1_with_data_stops_at_the_missing_weights(pretraining_data):
    message = one_error(blip2("pretrain", "stage1", "--vit", "eva-g", cwd=pretraining_data,
                              env={"HF_HOME": str(pretraining_data / "hf")}))
    # the first frozen piece it builds: the BERT tokenizer and weights the Q-Former starts from
    assert "google-bert/bert-base-uncased is not in the Hugging Face cache" in message
    assert "hf download google-bert/bert-base-uncased" in message


def test_stage2_with_data_names_the_missing_stage1_run_then_the_llm(pretraining_data):
    home = {"HF_HOME": str(pretraining_data / "hf")}
    message = one_error(blip2("pretrain", "stage2", "--llm", "flant5-xl", "--init", "runs/stage1/latest",
                              cwd=pretraining_data, env=home))
    assert "--init runs/stage1/latest: no such run directory or checkpoint" in message
    assert "blip2 pretrain stage1" in message
    first = blip2("pretrain", "stage1", "--recipe", "tiny", "--set", "train.steps=1", "--name", "stage1",
                  cwd=pretraining_data, env=home)
    assert first.returncode == 0, first.stderr[-3000:]
    message = one_error(blip2("pretrain", "stage2", "--llm", "flant5-xl", "--init", "runs/stage1/latest",
                              cwd=pretraining_data, env=home))
    assert "google/flan-t5-xl is not in the Hugging Face cache" in message and "hf download google/flan-t5-xl" \
        in message


# --- blip2 eval <benchmark> --zero-shot -----------------------------------------------------------------


def protocol(benchmark: str):
    cls = RetrievalEval if benchmark == "flickr30k" else GenerationEval
    return load_recipe(cls, f"eval/{benchmark}").zero_shot


@pytest.mark.parametrize("benchmark", ["vqav2", "okvqa", "gqa", "coco", "nocaps", "flickr30k"])
def test_zero_shot_defaults_are_where_prepare_puts_them(benchmark):
    zero_shot = protocol(benchmark)
    dataset = benchmark
    names = {f.name for f in annotations.annotation_files(dataset)}
    for path in map(Path, zero_shot.files.values()):
        assert path.parent == Path("data") / dataset / "annotations" and path.name in names
    assert zero_shot.prepare.startswith(f"blip2 prepare {dataset}")
    split = zero_shot.prepare.split("--split ")[1]
    assert {Path(p).name for p in zero_shot.files.values()} <= {f.name for f in
                                                                annotations.annotation_files(dataset, [split])}
    assert zero_shot.images.startswith("data/") and zero_shot.images_source
    from blip2cli.models.registry import REGISTRY

    assert REGISTRY[zero_shot.model].kind == "blip2"


def test_zero_shot_models_are_the_papers():
    models = {b: protocol(b).model for b in ("vqav2", "okvqa", "gqa", "coco", "nocaps", "flickr30k")}
    assert models == {"vqav2": "blip2-flan-t5-xl", "okvqa": "blip2-flan-t5-xl", "gqa": "blip2-flan-t5-xl",
                      "coco": "blip2-opt-2.7b-coco", "nocaps": "blip2-flan-t5-xl-coco",
                      "flickr30k": "blip2-itm-vit-g-coco"}


@pytest.mark.parametrize("benchmark", ["vqav2", "okvqa", "gqa", "coco", "nocaps", "flickr30k"])
def test_zero_shot_without_data_names_the_file_and_the_prepare_command(tmp_path, benchmark):
    zero_shot = protocol(benchmark)
    message = one_error(in_process("eval", benchmark, "--zero-shot", cwd=tmp_path))
    first = next(iter(zero_shot.files.values()))
    assert message == f"error: {first}: not found; `{zero_shot.prepare}` gets it (or give " \
                      f"--{next(iter(zero_shot.files))} FILE)"
    assert not (tmp_path / "data").exists()


def vqa_images(root: Path) -> list[Path]:
    """Five COCO val2014 images where the zero-shot protocol looks for them."""
    image_dir = root / "data" / "coco" / "images" / "val2014"
    image_dir.mkdir(parents=True)
    paths = [image_dir / f"COCO_val2014_{image_id:012d}.jpg" for image_id in range(1, 6)]
    for image_id, path in enumerate(paths, 1):
        tiny.draw_image(image_id).save(path)
    return paths


def vqa_files(root: Path, answers: list[str]) -> None:
    """Five questions, one per image, where ``blip2 prepare vqav2`` writes the official val files; the ten
    annotators of question i all answered ``answers[i]``."""
    ann_dir = root / "data" / "vqav2" / "annotations"
    ann_dir.mkdir(parents=True, exist_ok=True)
    questions = [{"image_id": i + 1, "question": q, "question_id": 100 + i} for i, q in enumerate(QUESTIONS)]
    (ann_dir / "v2_OpenEnded_mscoco_val2014_questions.json").write_text(json.dumps({"questions": questions}))
    (ann_dir / "v2_mscoco_val2014_annotations.json").write_text(json.dumps({"annotations": [
        {"question_id": q["question_id"], "image_id": q["image_id"], "answer_type": "other", "question_type": "what",
         "answers": [{"answer": answer, "answer_id": k + 1} for k in range(10)]}
        for q, answer in zip(questions, answers)]}))


def said_by(model_dir: Path, images: list[Path]) -> list[str]:
    """What the model answers under the zero-shot VQA recipe (with the tests' small decoding)."""
    import blip2cli

    settings = load_recipe(GenerationEval, "eval/vqav2", SMALL[1::2])
    model = blip2cli.load(str(model_dir), device="cpu", dtype="float32")
    return model.generate(images, [settings.prompt.format(q) for q in QUESTIONS], batch_size=settings.batch_size,
                          num_beams=settings.num_beams, max_new_tokens=settings.max_new_tokens,
                          min_new_tokens=settings.min_new_tokens, length_penalty=settings.length_penalty,
                          beam_scoring=settings.decoding.beam_scoring)


def test_vqav2_zero_shot_runs_and_scores_on_the_prepared_layout(tmp_path, hf_t5):
    said = said_by(hf_t5, vqa_images(tmp_path))
    vqa_files(tmp_path, [said[0], said[1], "zebra", "zebra", "zebra"])
    proc = in_process("eval", "vqav2", "--zero-shot", "--model", str(hf_t5), "--device", "cpu", "--json", *SMALL,
                 cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    preds = json.loads((tmp_path / "runs" / "vqav2-t5" / "predictions.json").read_text())
    assert [p["answer"] for p in preds] == said
    assert result["num_questions"] == 5
    assert result["accuracy"] == 100.0 * (2 + said[2:].count("zebra")) / 5


def test_explicit_options_override_the_zero_shot_defaults(tmp_path):
    message = one_error(in_process("eval", "vqav2", "--zero-shot", "--questions", "mine.json", "--annotations",
                                   "a.json", "--model", "m", cwd=tmp_path))
    assert message.startswith("error: questions file not found: mine.json")
    vqa_files(tmp_path, ["zebra"] * 5)
    message = one_error(in_process("eval", "vqav2", "--zero-shot", cwd=tmp_path))
    assert message == ("error: data/coco/images: no such image directory; the COCO val2014 images: unpack "
                       "http://images.cocodataset.org/zips/val2014.zip into data/coco/images (or give --images DIR)")
    message = one_error(in_process("eval", "vqav2", "--zero-shot", "--images", "elsewhere", cwd=tmp_path))
    assert message == "error: elsewhere: no such image directory; check --images"


# --- unreadable images ------------------------------------------------------------------------------------


def spoil(paths: list[Path]) -> None:
    """The second image goes missing, the fourth is cut short."""
    paths[1].unlink()
    paths[3].write_bytes(paths[3].read_bytes()[:60])


def test_generation_eval_skips_unreadable_images_scores_the_rest_and_exits_3(tmp_path, hf_opt):
    images = vqa_images(tmp_path)
    vqa_files(tmp_path, ["zebra"] * 5)
    spoil(images)
    args = ["eval", "vqav2", "--zero-shot", "--model", str(hf_opt), "--device", "cpu", "--json", "--name", "v", *SMALL]
    proc = in_process(*args, cwd=tmp_path)
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    errors = sorted(line for line in proc.stderr.splitlines() if line.startswith("error: "))
    assert len(errors) == 2
    assert errors[0] == f"error: {images[1].relative_to(tmp_path)}: no such file"
    assert errors[1].startswith(f"error: {images[3].relative_to(tmp_path)}: corrupt or truncated image")
    result = json.loads(proc.stdout)
    assert result["num_questions"] == 3 and result["skipped"] == 2
    assert any("could not be read" in note for note in result["notes"])
    preds = json.loads((tmp_path / "runs" / "v" / "predictions.json").read_text())
    assert [p["question_id"] for p in preds] == [100, 102, 104]

    tiny.draw_image(2).save(images[1])  # mended: a rerun predicts the two that were skipped
    tiny.draw_image(4).save(images[3])
    again = in_process(*args, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads(again.stdout)["num_questions"] == 5
    assert [p["question_id"] for p in json.loads((tmp_path / "runs" / "v" / "predictions.json").read_text())] == \
        [100, 101, 102, 103, 104]


def flickr_benchmark(root: Path) -> list[Path]:
    """A five-image retrieval split where ``blip2 prepare flickr30k`` and the protocol put it."""
    ann_dir = root / "data" / "flickr30k" / "annotations"
    ann_dir.mkdir(parents=True)
    image_dir = root / "data" / "flickr30k" / "images" / "flickr30k-images"
    image_dir.mkdir(parents=True)
    split, paths = [], []
    for i in range(5):
        paths.append(image_dir / f"{1000 + i}.jpg")
        tiny.draw_image(i).save(paths[-1])
        split.append({"image": f"flickr30k-images/{1000 + i}.jpg", "caption": [tiny.CORPUS[i], tiny.CORPUS[i + 1]]})
    (ann_dir / "flickr30k_test.json").write_text(json.dumps(split))
    return paths


def test_flickr30k_zero_shot_runs_with_the_recipes_k(tmp_path, hf_itm):
    flickr_benchmark(tmp_path)
    proc = in_process("eval", "flickr30k", "--zero-shot", "--model", str(hf_itm), "--device", "cpu", "--json",
                 cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    assert result["num_images"] == 5 and result["num_texts"] == 10
    assert result["k"] == load_recipe(RetrievalEval, "eval/flickr30k").k


def test_retrieval_refuses_upfront_naming_every_unreadable_image(tmp_path, hf_itm):
    paths = flickr_benchmark(tmp_path)
    spoil(paths)
    message = one_error(in_process("eval", "flickr30k", "--zero-shot", "--model", str(hf_itm), "--device", "cpu",
                              cwd=tmp_path))
    assert message.startswith("error: 2 of 5 images cannot be read")
    assert f"{paths[1].relative_to(tmp_path)}: no such file" in message
    assert f"{paths[3].relative_to(tmp_path)}: corrupt or truncated image" in message
    assert not (tmp_path / "runs").exists()


# --- blip2 prepare laion --subset 115m, blip2 prepare vqav2 ---------------------------------------------------


def laion_metadata(directory: Path, rows: int) -> None:
    """A LAION-400M metadata part file whose URLs point at a closed local port."""
    directory.mkdir(parents=True)
    pq.write_table(pa.table({"SAMPLE_ID": list(range(rows)),
                             "URL": [f"http://127.0.0.1:9/{i}.jpg" for i in range(rows)],
                             "TEXT": [f"caption {i}" for i in range(rows)], "similarity": [0.31] * rows,
                             "NSFW": ["UNLIKELY"] * rows}), directory / "part-00000.parquet")


def test_prepare_laion_without_metadata_says_where_to_get_and_put_it(tmp_path):
    message = one_error(in_process("prepare", "laion", "--subset", "115m", cwd=tmp_path))
    assert message.startswith("error: prepare laion: no parquet metadata in data/laion400m-meta/; put the 32 "
                              "parquet files of the LAION-400M metadata")
    assert "https://the-eye.eu/public/AI/cah/laion400m-met-release/laion400m-meta/" in message
    assert message.endswith("there (or give --input FILES)")
    assert not (tmp_path / "data").exists()


def test_prepare_laion_reads_the_metadata_from_the_default_place(tmp_path):
    laion_metadata(tmp_path / "data" / "laion400m-meta", 10)
    message = one_error(in_process("prepare", "laion", "--subset", "115m", cwd=tmp_path))
    assert message == "error: --subset 115000000: the input has only 10 rows"
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["laion400m-meta"]  # nothing half-made
    proc = blip2("prepare", "laion", "--subset", "3", "--processes", "1", "--threads", "2", "--set", "timeout=2",
                 "--json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout)
    assert summary["rows"] == 3 and summary["out"] == "data/laion3" and summary["successes"] == 0
    assert summary["failed_to_download"] == 3


def test_failed_offline_prepare_leaves_no_directories(tmp_path):
    message = one_error(in_process("prepare", "vqav2", cwd=tmp_path))
    assert "cannot get vqa_train.json: offline" in message and "data/vqav2/annotations" in message
    assert list(tmp_path.iterdir()) == []


def test_every_eval_recipe_loads():
    """Every eval recipe but COCO retrieval (fine-tuned in the paper) has a zero-shot protocol; retrieval's hold k."""
    for path in sorted((recipes_root() / "eval").glob("*.yaml")):
        retrieval = path.stem in ("flickr30k", "coco-retrieval")
        spec = load_recipe(RetrievalEval if retrieval else GenerationEval, f"eval/{path.stem}")
        assert spec.zero_shot.model or path.stem == "coco-retrieval"
        if retrieval:
            assert spec.k > 0 and spec.batch_size > 0
