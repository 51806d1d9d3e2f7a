"""VQA fine-tuning: the Q-Former that reads the question, BLIP's answer-weighted loss, the two-shape QA set, and
``blip2 finetune vqa`` through the CLI with ``blip2 eval vqav2`` and ``blip2 generate`` on what it made."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

import blip2cli
from blip2cli.api import questions_and_prompts
from blip2cli.data.datasets import VqaJsonDataset, answer_weights
from blip2cli.data.synthetic import ShapesQADataset
from blip2cli.runtime.errors import Blip2Error
from blip2cli.train.tasks import Stage2Loss
from blip2cli.train.vqa import VqaTask

from tests.helpers import blip2, in_process
from tests.train.tiny_tasks import question_aware


def test_a_question_masked_out_leaves_the_plain_q_former(trained_tiny):
    """With every question token masked, the queries attend only to each other and the image: the query output is
    the question-blind Q-Former's; with the question visible it changes."""
    model = blip2cli.load(str(trained_tiny / "runs" / "tiny-stage2" / "latest"), device="cpu", dtype="float32")
    aware = question_aware(model.net, vocab_size=40, max_positions=16).eval()
    torch.manual_seed(0)
    pixels = torch.randn(3, 3, 64, 64)
    ids = torch.randint(5, 40, (3, 7))
    with torch.no_grad():
        plain = model.net.soft_prompts(pixels)
        masked = aware.soft_prompts(pixels, ids, torch.zeros_like(ids))
        seen = aware.soft_prompts(pixels, ids, torch.ones_like(ids))
    torch.testing.assert_close(masked, plain, atol=1e-6, rtol=1e-6)
    assert (seen - plain).abs().max() > 1e-3
    with pytest.raises(ValueError, match="reads the question"):
        aware.soft_prompts(pixels)


def test_answer_weights_are_the_annotators_shares():
    assert answer_weights(["2"] * 6 + ["3"] * 3 + ["two"]) == (["2", "3", "two"], [0.6, 0.3, 0.1])
    assert answer_weights("yes") == (["yes"], [1.0])


def test_vqa_loss_is_blips_weighted_sum_over_answers(trained_tiny):
    """The loss equals a direct computation: each (question, answer) sequence's summed token loss on the answer and
    its newline, times the answer's share, summed and divided by the number of questions."""
    model = blip2cli.load(str(trained_tiny / "runs" / "tiny-stage2" / "latest"), device="cpu", dtype="float32")
    tok, net = model.checkpoint.tokenizer, model.net.eval()
    task = VqaTask(net, tok, None, Stage2Loss(prompt="Question: {} Answer:"))
    torch.manual_seed(1)
    pixels = torch.randn(2, 3, 64, 64)
    batch = {"image": pixels, "question": ["what colour is the circle ?", "what is the red shape ?"],
             "answers": [["red", "blue"], ["square"]], "weights": [[0.7, 0.3], [1.0]]}
    with torch.no_grad():
        loss = float(task(batch)["loss"])
        expected = 0.0
        soft = net.soft_prompts(pixels)
        for i, answer, weight in [(0, "red", 0.7), (0, "blue", 0.3), (1, "square", 1.0)]:
            prompt = tok(f"Question: {batch['question'][i]} Answer:").input_ids
            tail = tok(f" {answer}\n", add_special_tokens=False).input_ids
            ids = torch.tensor([prompt + tail])
            logits = net.language_model(soft[i:i + 1], ids, torch.ones_like(ids)).logits[0, soft.shape[1]:]
            targets = torch.tensor(tail)
            expected += weight * float(F.cross_entropy(logits[len(prompt) - 1:-1], targets, reduction="sum"))
    assert loss == pytest.approx(expected / 2, rel=1e-5)
    with pytest.raises(ValueError, match="marks the question"):
        VqaTask(net, tok, None, Stage2Loss(prompt="Answer:"))


def test_shapes_qa_questions_need_the_image_and_the_question(tmp_path):
    data = ShapesQADataset(size=60, image_size=64)
    answers = {}
    for i in range(60):
        item = data[i]
        answers.setdefault(item["question"], set()).add(item["answers"][0])
    assert any(len(a) > 1 for a in answers.values())  # one question, several answers: the image decides
    questions_file, annotations_file = ShapesQADataset("heldout", size=5).write_vqa(tmp_path)
    questions = json.loads(questions_file.read_text())["questions"]
    assert [q["question_id"] for q in questions] == list(range(5))
    assert (tmp_path / "val2014" / "COCO_val2014_000000000004.jpg").exists()
    assert len(json.loads(annotations_file.read_text())["annotations"][0]["answers"]) == 10


def test_vqa_json_reads_lavis_lists_and_skips_an_unreadable_image(tmp_path):
    ShapesQADataset(size=2).example(0)[0].save(tmp_path / "a.png")
    (tmp_path / "b.png").write_bytes(b"not an image")
    (tmp_path / "qa.json").write_text(json.dumps([
        {"image": "b.png", "question": "What is it?", "answer": ["x"]},
        {"image": "a.png", "question": "What colour: is it?", "answer": ["red", "red", "blue", "red"]}]))
    data = VqaJsonDataset(tmp_path / "qa.json", tmp_path)
    item = data[0]  # b.png cannot be read: the next entry stands in
    assert item["question"] == "what colour is it?" and item["answers"] == ["red", "blue"]
    assert item["weights"] == [0.75, 0.25] and data.skipped == 1


def test_the_question_is_the_templates_blank_or_the_whole_prompt():
    template = "Question: {} Answer:"
    prompts, questions = questions_and_prompts(["Question: what is it? Answer:", "how many?"], None, template, "m")
    assert prompts == ["Question: what is it? Answer:", "Question: how many? Answer:"]
    assert questions == ["what is it?", "how many?"]
    assert questions_and_prompts(["Q"], ["given"], template, "m") == (["Q"], ["given"])
    with pytest.raises(Blip2Error, match="answers questions"):
        questions_and_prompts([template], None, template, "m")


def _finetune(trained, tmp_path, *args, init: str = "tiny-stage2", run=blip2):
    return run("finetune", "vqa", "--recipe", "tiny", "--init", str(trained / "runs" / init / "latest"),
               "--set", f"model.qformer_text_init={trained / 'runs' / 'tiny-stage1' / 'latest'}", "--out", "runs",
               *args, cwd=tmp_path)


def test_finetune_vqa_then_eval_and_generate_use_the_question(trained_tiny, tmp_path):
    proc = _finetune(trained_tiny, tmp_path, "--set", "train.steps=2", "--set", "train.save_every=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "runs" / "tiny-vqa" / "latest"
    tuned = blip2cli.load(str(run), device="cpu", dtype="float32")
    assert tuned.reads_questions and tuned.checkpoint.generation == "vqa-finetuned"
    assert tuned.checkpoint.qformer_tokenizer is not None
    init = blip2cli.load(str(trained_tiny / "runs" / "tiny-stage2" / "latest"), device="cpu", dtype="float32")
    before, after = init.net.state_dict(), tuned.net.state_dict()
    block = "vision.trunk.blocks.0.mlp.fc1.weight"
    assert not torch.equal(before[block], after[block])
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith("language_model."))
    stage1 = blip2cli.load(str(trained_tiny / "runs" / "tiny-stage1" / "latest"), device="cpu", dtype="float32")
    key = "qformer.embeddings.word.weight"
    assert not torch.equal(stage1.net.state_dict()[key], after[key])  # the question's embeddings were trained

    data = tmp_path / "qa"
    questions, annotations = ShapesQADataset("heldout", size=6).write_vqa(data)
    proc = blip2("eval", "vqav2", "--model", str(run), "--questions", str(questions), "--annotations",
                 str(annotations), "--images", str(data), "--device", "cpu", "--json", "--set", "num_beams=2",
                 "--set", "batch_size=4", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout)["num_questions"] == 6
    provenance = json.loads(next((tmp_path / "runs").rglob("provenance.json")).read_text())
    assert "Question: {} Answer:" in json.dumps(provenance)  # the fine-tune's own prompt, not the zero-shot one
    predictions = json.loads(next((tmp_path / "runs").rglob("predictions.json")).read_text())
    asked = json.loads(questions.read_text())["questions"]
    images = [data / "val2014" / f"COCO_val2014_{q['image_id']:012d}.jpg" for q in asked]
    said = tuned.generate(images, [f"Question: {q['question']} Answer:" for q in asked], num_beams=2,
                          length_penalty=-1.0, max_new_tokens=10, min_new_tokens=1, beam_scoring="lavis")
    assert [p["answer"] for p in predictions] == said

    image = images[0]
    proc = blip2("generate", str(image), "what colour is the circle ?", "--model", str(run), "--device", "cpu",
                 "--json", "--num-beams", "2", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    shown = json.loads(proc.stdout.splitlines()[0])
    assert shown["text"] == tuned.generate(image, "Question: what colour is the circle ? Answer:", num_beams=2)

    # the export's model card: a VQA model in the InstructBLIP layout, with the accuracy eval just measured
    from huggingface_hub import ModelCard

    scored = json.loads(next((tmp_path / "runs").rglob("results.json")).read_text())
    assert scored["model"]["source"] == str(run.resolve())
    exported = in_process("convert", "runs/tiny-vqa/latest", "--out", "exported", cwd=tmp_path)
    assert exported.returncode == 0, exported.stderr[-3000:]
    card = ModelCard.load(tmp_path / "exported" / "README.md")
    assert card.data.pipeline_tag == "visual-question-answering" and "instructblip" in card.data.tags
    [result] = card.data.eval_results
    assert (result.dataset_type, result.metric_type) == ("vqav2", "accuracy")
    assert result.metric_value == round(scored["accuracy"], 2)
    assert "shapes_qa" in card.text  # the recipe's data


@pytest.mark.parametrize("args, message", [
    (["STAGE1"], "not a stage-2 (image-to-text) model"),
    (["--set", "model.qformer_text_init=null"], "its Q-Former has no text side to read the question with"),
    (["--set", "model.image_size=60"], "not a multiple of the tower's patch size"),
    (["--set", "stage2.prompt=Short answer"], "a VQA prompt marks the question with {}"),
])
def test_finetune_vqa_bad_input_is_one_line(trained_tiny, tmp_path, args, message):
    proc = _finetune(trained_tiny, tmp_path, init="tiny-stage1", run=in_process) if args == ["STAGE1"] else \
        _finetune(trained_tiny, tmp_path, *args, run=in_process)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], proc.stderr


def test_a_missing_vqa_dataset_names_the_prepare_command(tmp_path):
    proc = blip2("finetune", "vqa", "--init", "blip2-opt-2.7b", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert "data/vqav2/annotations/vqa_train.json (make it: `blip2 prepare vqav2`)" in lines[0]
    assert "data/vg/annotations/vg_qa.json (make it: `blip2 prepare vg`)" in lines[0]


@pytest.mark.slow
def test_a_killed_vqa_fine_tune_resumes_to_the_uninterrupted_run(trained_tiny, tmp_path):
    """SIGKILL after the first checkpoint, rerun: the losses after it and the final weights (the trained ViT's
    fp32 weights and the Q-Former's included) equal a run never interrupted."""
    from tests.helpers import straight_and_killed_runs
    from tests.train.test_train import _final_weights, _metrics

    args = ["finetune", "vqa", "--recipe", "tiny", "--init", str(trained_tiny / "runs" / "tiny-stage2" / "latest"),
            "--set", f"model.qformer_text_init={trained_tiny / 'runs' / 'tiny-stage1' / 'latest'}", "--out", "runs",
            "--set", "train.steps=6", "--set", "train.save_every=3", "--set", "train.log_every=1000"]
    straight, run = straight_and_killed_runs(args, tmp_path, "step-000003")
    a, b = _metrics(straight), _metrics(run)
    for step in range(4, 7):
        assert b[step]["loss"] == pytest.approx(a[step]["loss"], rel=1e-5), step
    wa, wb = _final_weights(straight), _final_weights(run)
    assert wa.keys() == wb.keys() and any(k.startswith("vision.") for k in wa)
    for k in wa:
        if not k.endswith("key.bias"):  # softmax ignores a key bias: its gradient is rounding noise (test_train)
            torch.testing.assert_close(wb[k], wa[k], atol=1e-5, rtol=0, msg=k)
