"""The ``blip2`` console script, run as users run it: JSON purity, exit codes, one-line errors."""

from __future__ import annotations

import json
from functools import partial

import pytest

import blip2cli

from tests import helpers
from tests.helpers import blip2
from tests.tiny import write_lavis

assert_one_line_error = partial(helpers.assert_one_line_error, code=None)  # with any exit status but 0


def test_json_lines_are_all_of_stdout(hf_opt, image_files):
    images = [str(p) for p in image_files[:3]]
    proc = blip2("generate", *images, "a photo of", "--model", str(hf_opt), "--json", "--num-beams", "3",
                 "--max-new-tokens", "5", "--device", "cpu", "--batch-size", "2")
    assert proc.returncode == 0, proc.stderr
    records = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["image"] for r in records] == images
    assert all(r["prompt"] == "a photo of" and set(r) == {"image", "prompt", "text"} for r in records)
    expected = blip2cli.load(str(hf_opt), device="cpu", dtype="float32").generate(
        images, "a photo of", num_beams=3, max_new_tokens=5)
    assert [r["text"] for r in records] == expected


def test_directories_globs_and_several_captions(hf_t5, image_files):
    folder = image_files[0].parent
    proc = blip2("generate", str(folder), str(folder / "img[01].png"), "--model", str(hf_t5), "--json",
                 "--num-beams", "2", "--num-captions", "2", "--max-new-tokens", "3")
    assert proc.returncode == 0, proc.stderr
    records = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(records) == len(image_files) + 2
    assert all(len(r["texts"]) == 2 and "text" not in r for r in records)
    assert records[0]["prompt"] == ""  # the model's recipe prompt for captioning


def test_plain_output_names_each_image(hf_opt, image_files):
    proc = blip2("generate", str(image_files[0]), "--model", str(hf_opt), "--max-new-tokens", "3", "--num-beams", "1")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"{image_files[0]}: ")


def test_missing_image(hf_opt, tmp_path):
    assert_one_line_error(blip2("generate", str(tmp_path / "nope.jpg"), "--model", str(hf_opt)), "nope.jpg",
                          "no such file")


def test_corrupt_and_non_image_files(hf_opt, image_files, tmp_path):
    truncated = tmp_path / "cut.png"
    truncated.write_bytes(image_files[0].read_bytes()[:60])
    assert_one_line_error(blip2("generate", str(truncated), "--model", str(hf_opt)), "cut.png")
    text = tmp_path / "notes.png"
    text.write_text("not a picture")
    assert_one_line_error(blip2("generate", str(text), "--model", str(hf_opt)), "notes.png", "not an image")


def test_unknown_model_suggests_close_names(image_files):
    assert_one_line_error(blip2("generate", str(image_files[0]), "--model", "blip2-opt-2.7"), "unknown model",
                          "blip2-opt-2.7b")


def test_offline_hub_id_not_cached(image_files, tmp_path):
    env = {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_CACHE": str(tmp_path / "hf" / "hub")}
    proc = blip2("generate", str(image_files[0]), "--model", "someone/blip2-missing", env=env)
    assert_one_line_error(proc, "someone/blip2-missing", "HF_HUB_OFFLINE", "hf download someone/blip2-missing")
    proc = blip2("generate", str(image_files[0]), "--model", "blip2-flan-t5-xl", env=env)
    assert_one_line_error(proc, "Salesforce/blip2-flan-t5-xl", "not in the Hugging Face cache")


def test_lavis_stage2_without_llm(hf_opt, image_files, tmp_path):
    pth = tmp_path / "blip2_pretrained_opt.pth"
    write_lavis(blip2cli.load(str(hf_opt), device="cpu", dtype="float32"), pth, "opt")
    assert_one_line_error(blip2("generate", str(image_files[0]), "--model", str(pth)), "--llm")


@pytest.mark.parametrize("option,value,fragment", [("--dtype", "float8", "unknown dtype"),
                                                   ("--device", "tpu", "unknown device"),
                                                   ("--device", "cuda:7", "cuda:7")])
def test_bad_dtype_and_device(hf_opt, image_files, option, value, fragment):
    assert_one_line_error(blip2("generate", str(image_files[0]), "--model", str(hf_opt), option, value), fragment)


def test_models_lists_the_registry():
    proc = blip2("models", "--json")
    assert proc.returncode == 0
    names = {json.loads(line)["name"] for line in proc.stdout.splitlines()}
    wanted = {"blip2-opt-2.7b", "blip2-opt-6.7b", "blip2-opt-2.7b-coco", "blip2-opt-6.7b-coco", "blip2-flan-t5-xl",
              "blip2-flan-t5-xxl", "blip2-flan-t5-xl-coco", "blip2-itm-vit-g", "blip2-itm-vit-g-coco", "eva-g",
              "clip-l", "opt-2.7b", "opt-6.7b", "flant5-xl", "flant5-xxl", "lavis-stage1-vit-g", "lavis-stage1-vit-l",
              "lavis-stage2-opt-2.7b", "lavis-stage2-flant5-xl-vit-l"}
    assert wanted <= names


def test_convert_to_transformers(hf_itm, tmp_path):
    from transformers import Blip2ForImageTextRetrieval

    proc = blip2("convert", str(hf_itm), "--out", str(tmp_path / "hf"), "--to", "hf")
    assert proc.returncode == 0, proc.stderr
    model = Blip2ForImageTextRetrieval.from_pretrained(tmp_path / "hf")
    assert model.config.num_query_tokens == 4


@pytest.mark.parametrize("args,fragment", [(["pretrain", "stage1", "--vitt", "eva-g"], "No such option: --vitt"),
                                           (["generate", "x.png", "--num-beams", "zero"], "--num-beams"),
                                           (["nope"], "No such command 'nope'")])
def test_usage_errors_are_one_line_naming_the_help(args, fragment):
    proc = blip2(*args)
    assert_one_line_error(proc, fragment, "--help')")
    assert proc.returncode == 2


def test_version():
    proc = blip2("--version")
    assert proc.returncode == 0
    assert proc.stdout.strip() == f"blip2 {blip2cli.__version__}"


def test_models_piped_prints_whole_names():
    from blip2cli.models.registry import ENTRIES

    proc = blip2("models")  # stdout is a pipe here, as in `blip2 models | grep opt`
    assert proc.returncode == 0
    rows = [line.split("\t") for line in proc.stdout.splitlines()]
    assert [r[0] for r in rows] == [e.name for e in ENTRIES]
    assert all(len(r) == 4 for r in rows)
    assert max(len(line) for line in proc.stdout.splitlines()) > 80  # nothing cut to a terminal's width
