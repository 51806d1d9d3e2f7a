"""``blip2 eval`` running tiny models over tiny benchmarks: predictions, scores, resume, two ranks."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

import blip2cli
from blip2cli.config import load_recipe
from blip2cli.eval.data import vqa_items
from blip2cli.eval.generation import GenerationEval, predict

from tests import tiny
from tests.helpers import blip2, in_process

QUESTIONS = ["what is on the table?", "what colour is the sky?", "how many dogs are there?", "is it a circle?",
             "what is the man riding?"]
SMALL = ["--set", "batch_size=2", "--set", "max_new_tokens=3", "--set", "num_beams=2"]


@pytest.fixture
def vqa(tmp_path, hf_opt):
    """Five questions on three COCO-named images; two questions' answers are what the model says."""
    root = tmp_path / "coco"
    (root / "val2014").mkdir(parents=True)
    for image_id in (1, 2, 3):
        tiny.draw_image(image_id).save(root / "val2014" / f"COCO_val2014_{image_id:012d}.jpg")
    questions = {"questions": [{"image_id": 1 + i % 3, "question": q, "question_id": 100 + i}
                               for i, q in enumerate(QUESTIONS)]}
    (tmp_path / "q.json").write_text(json.dumps(questions))
    model = blip2cli.load(str(hf_opt), device="cpu", dtype="float32")
    items = vqa_items(tmp_path / "q.json", root)
    said = model.generate([it.image for it in items], [f"Question: {it.text} Short answer:" for it in items],
                          num_beams=2, max_new_tokens=3, min_new_tokens=1, length_penalty=0.0, beam_scoring="lavis")
    annotations = {"annotations": [
        {"question_id": it.id, "image_id": 1, "answer_type": "other", "question_type": "what",
         "answers": [{"answer": said[i] if i < 2 else "zebra", "answer_id": k + 1} for k in range(10)]}
        for i, it in enumerate(items)]}
    (tmp_path / "a.json").write_text(json.dumps(annotations))
    return tmp_path, root, said


def test_vqa_run_writes_official_results_and_scores_them(vqa, hf_opt):
    """The scores on stdout (--json), beside the paper's figure of the model --paper names, and in results.json
    with the benchmark and the model: a local checkpoint by its real path."""
    tmp, root, said = vqa
    proc = in_process("eval", "vqav2", "--model", str(hf_opt), "--images", str(root), "--questions", "q.json",
                 "--annotations", "a.json", "--name", "v", "--json", "--device", "cpu", *SMALL,
                 "--paper", "blip2-opt-2.7b", cwd=tmp)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    preds = json.loads((tmp / "runs" / "v" / "predictions.json").read_text())
    assert [p["question_id"] for p in preds] == [100, 101, 102, 103, 104]
    assert [p["answer"] for p in preds] == said
    # two questions answered as all ten annotators did, three never: 2/5 of the questions right
    expected = 40.0 if said[2:].count("zebra") == 0 else None
    assert result["accuracy"] == expected
    figure = load_recipe(GenerationEval, "eval/vqav2").paper.models["blip2-opt-2.7b"].figures["accuracy"]
    assert result["paper"]["figures"] == {"accuracy": figure}
    assert result["paper"]["difference"] == {"accuracy": pytest.approx(expected - figure, abs=1e-6)}
    saved = json.loads((tmp / "runs" / "v" / "results.json").read_text())
    assert saved == {**result, "benchmark": "vqav2", "model": {"label": hf_opt.name,
                                                               "source": str(Path(hf_opt).resolve())}}
    assert "predictions and results: runs/v\n" in proc.stderr


def test_a_stopped_run_resumes_without_recomputing(vqa, hf_opt):
    tmp, root, _ = vqa
    model = blip2cli.load(str(hf_opt), device="cpu", dtype="float32")
    items = vqa_items(tmp / "q.json", root)
    settings = GenerationEval(prompt="Question: {} Short answer:", num_beams=2, max_new_tokens=3, batch_size=2)
    out = tmp / "runs" / "resume"
    calls = []
    original = model.generate
    model.generate = lambda images, *a, **k: calls.append(len(images)) or original(images, *a, **k)
    first = json.loads(predict(model, items, settings, out, "question_id", "answer").read_text())
    assert sum(calls) == 5
    shard = out / "predictions.rank000.jsonl"
    lines = shard.read_text().splitlines()
    shard.write_text("\n".join(lines[:3]) + "\n" + lines[3][:10])  # killed while writing the fourth
    calls.clear()
    again = json.loads(predict(model, items, settings, out, "question_id", "answer").read_text())
    assert sum(calls) == 2  # only the lost ones
    assert again == first


@pytest.mark.distributed
def test_two_ranks_give_the_same_predictions_and_scores(vqa, hf_opt):
    tmp, root, _ = vqa
    args = ["eval", "vqav2", "--model", str(hf_opt), "--images", str(root), "--questions", "q.json",
            "--annotations", "a.json", "--json", "--device", "cpu", *SMALL]
    one = in_process(*args, "--name", "one", cwd=tmp)
    assert one.returncode == 0, one.stderr[-3000:]
    two = blip2(*args, "--name", "two", cwd=tmp, ranks=2)
    assert two.returncode == 0, two.stderr[-3000:]
    assert len(list((tmp / "runs" / "two").glob("predictions.rank*.jsonl"))) == 2
    assert (tmp / "runs" / "two" / "predictions.json").read_text() == (tmp / "runs" / "one" /
                                                                        "predictions.json").read_text()
    assert json.loads(two.stdout)["accuracy"] == json.loads(one.stdout)["accuracy"]


def test_captioning_run(tmp_path, hf_t5):
    root = tmp_path / "images"
    root.mkdir()
    images, annotations = [], []
    for i in range(3):
        tiny.draw_image(i).save(root / f"img{i}.jpg")
        images.append({"id": 10 + i, "file_name": f"img{i}.jpg"})
        annotations += [{"image_id": 10 + i, "id": 3 * i + k, "caption": c}
                        for k, c in enumerate(["a red circle", "two dogs in a park", "a photo of a car"])]
    (tmp_path / "gt.json").write_text(json.dumps({"images": images, "annotations": annotations}))
    proc = in_process("eval", "coco", "--model", str(hf_t5), "--images", str(root), "--annotations", "gt.json",
                 "--name", "c", "--json", "--no-spice", "--device", "cpu", "--set", "max_new_tokens=4",
                 "--set", "min_new_tokens=1", "--set", "num_beams=2", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    assert {"Bleu_4", "METEOR", "ROUGE_L", "CIDEr"} <= set(result) and result["num_images"] == 3
    assert "paper" not in result  # a local checkpoint: no paper row without --paper
    preds = json.loads((tmp_path / "runs" / "c" / "predictions.json").read_text())
    assert [p["image_id"] for p in preds] == [10, 11, 12] and all(isinstance(p["caption"], str) for p in preds)


def test_missing_image_and_annotation_files_are_one_line_errors(vqa, hf_opt):
    tmp, root, _ = vqa
    proc = in_process("eval", "vqav2", "--model", str(hf_opt), "--images", str(tmp / "nowhere"), "--questions",
                      "q.json", "--annotations", "a.json", cwd=tmp)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "no such image" in proc.stderr
    proc = in_process("eval", "vqav2", "--model", str(hf_opt), "--images", str(root), "--questions", "missing.json",
                 "--annotations", "a.json", cwd=tmp)
    assert proc.returncode == 2 and "questions file not found" in proc.stderr and "visualqa.org" in proc.stderr
    assert torch.__version__  # the library imports cleanly alongside the CLI


def test_gqa_run_from_the_official_questions_file(tmp_path, hf_opt):
    root = tmp_path / "gqa"
    root.mkdir()
    for n in ("n1", "n2"):
        tiny.draw_image(len(n) + ord(n[1])).save(root / f"{n}.jpg")
    questions = {"q1": {"imageId": "n1", "question": "what is on the table?", "answer": "zebra"},
                 "q2": {"imageId": "n2", "question": "is it a circle?", "answer": "zebra"}}
    (tmp_path / "q.json").write_text(json.dumps(questions))
    proc = in_process("eval", "gqa", "--model", str(hf_opt), "--images", str(root), "--questions", "q.json",
                      "--name", "g", "--json", "--device", "cpu", *SMALL, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    preds = json.loads((tmp_path / "runs" / "g" / "predictions.json").read_text())
    assert [p["question_id"] for p in preds] == ["q1", "q2"]
    expected = 100.0 * sum(p["answer"] == "zebra" for p in preds) / 2
    assert json.loads(proc.stdout)["accuracy"] == expected


def test_nocaps_run_with_a_lavis_image_list_and_domains(tmp_path, hf_t5):
    root = tmp_path / "nocaps"
    root.mkdir()
    items, images, annotations = [], [], []
    for i, domain in enumerate(["in-domain", "near-domain", "out-domain"]):
        tiny.draw_image(i).save(root / f"{i}.jpg")
        items.append({"image": f"{i}.jpg", "img_id": i})
        images.append({"id": i, "file_name": f"{i}.jpg", "domain": domain})
        annotations += [{"image_id": i, "id": 2 * i + k, "caption": c} for k, c in enumerate(["a cat", "two dogs"])]
    (tmp_path / "items.json").write_text(json.dumps(items))
    (tmp_path / "gt.json").write_text(json.dumps({"images": images, "annotations": annotations}))
    proc = in_process("eval", "nocaps", "--model", str(hf_t5), "--images", str(root), "--items", "items.json",
                 "--annotations", "gt.json", "--name", "n", "--json", "--no-spice", "--device", "cpu",
                 "--set", "max_new_tokens=3", "--set", "min_new_tokens=1", "--set", "num_beams=2", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    assert set(result["subsets"]) == {"in-domain", "near-domain", "out-domain"}
    assert all(s["num_images"] == 1 for s in result["subsets"].values())


@pytest.mark.skipif(importlib.util.find_spec("spacy") is not None,
                    reason="spaCy is installed: this test watches the lemmatiser being asked for without it")
def test_okvqa_recipe_switches_the_lemmatiser_on(vqa, hf_opt):
    tmp, root, _ = vqa
    proc = in_process("eval", "okvqa", "--model", str(hf_opt), "--images", str(root), "--questions", "q.json",
                 "--annotations", "a.json", "--name", "ok", "--device", "cpu", *SMALL, "--set", "lemmatize=true",
                 cwd=tmp)
    assert proc.returncode == 2 and "spacy" in proc.stderr.lower() and proc.stderr.count("\n") == 1
    assert (tmp / "runs" / "ok" / "predictions.json").exists()  # the answers were kept for a later scoring


def test_test_dev_without_annotations_writes_predictions_for_the_server(vqa, hf_opt):
    tmp, root, said = vqa
    proc = in_process("eval", "vqav2", "--model", str(hf_opt), "--images", str(root), "--questions", "q.json",
                 "--name", "dev", "--json", "--device", "cpu", *SMALL, cwd=tmp)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    preds = json.loads(Path(out["predictions"]).read_text())
    assert [p["answer"] for p in preds] == said and "predictions only" in proc.stderr
    assert not (tmp / "runs" / "dev" / "results.json").exists() and "paper" not in out


def test_questions_of_one_image_share_its_image_pass(tmp_path, hf_opt):
    """Questions are batched by image, so that each image goes through the ViT once, and the predictions file is
    what answering one question at a time gives, in the questions' order."""
    from blip2cli.eval.runner import Item
    from blip2cli.models.decoding import Decoding

    paths = []
    for i in range(3):
        paths.append(tmp_path / f"{i}.png")
        tiny.draw_image(i).save(paths[-1])
    items = [Item(id=200 + i, image=paths[i % 3], text=QUESTIONS[i % len(QUESTIONS)]) for i in range(8)]
    model = blip2cli.load(str(hf_opt), device="cpu", dtype="float32")
    settings = GenerationEval(batch_size=16, generation="vqa",
                              decoding=Decoding(num_beams=3, max_new_tokens=4, beam_scoring="lavis"))
    vit_rows = []
    hook = model.net.vision.register_forward_hook(lambda m, args, out: vit_rows.append(args[0].shape[0]))
    try:
        preds = json.loads(predict(model, items, settings, tmp_path / "run", "question_id", "answer",
                                   show_progress=False).read_text())
    finally:
        hook.remove()
    assert vit_rows == [3]  # eight questions, three images, one pass each
    assert [p["question_id"] for p in preds] == [it.id for it in items]
    decoding = {k: v for k, v in settings.decoding.given().items() if k != "prompt"}
    alone = [model.generate([it.image], [settings.decoding.prompt.format(it.text)], **decoding)[0] for it in items]
    assert [p["answer"] for p in preds] == alone
    assert len(set(alone)) > 1
