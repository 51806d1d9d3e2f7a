"""``blip2 finetune caption`` through the CLI, from a tiny stage-2 model blip2 trained: the ViT trained at a new
image size, the LLM untouched, the held-out captioning loss lower than the init's, and bad input in one line."""

from __future__ import annotations

import json
import random

import pytest
import torch

import blip2cli

from tests.helpers import blip2


def _finetune(trained, tmp_path, *args):
    init = trained / "runs" / "tiny-stage2" / "latest"
    return blip2("finetune", "caption", "--recipe", "tiny", "--init", str(init), "--out", "runs", *args, cwd=tmp_path)


def heldout_loss(model, prompt: str = "a photo of") -> float:
    """The LM loss of the true captions of held-out shapes (the prompt not a target), under ``model``'s own image
    size and transform."""
    from blip2cli.data.synthetic import caption, render_shape
    from blip2cli.models.tiny import COLOURS, SHAPES
    from blip2cli.train.tasks import Stage2Loss, Stage2Task

    rng = random.Random(123)
    scenes = [(colour, shape) for colour in COLOURS for shape in SHAPES]
    size = model.config.vision.image_size
    pixels = torch.stack([model.transform(render_shape(c, s, size, rng)) for c, s in scenes])
    task = Stage2Task(model.net, model.checkpoint.tokenizer, Stage2Loss(max_txt_len=16, prompt=prompt))
    task.eval()
    with torch.no_grad():
        return float(task({"image": pixels, "text": [caption(c, s) for c, s in scenes]})["loss"])


def test_finetune_caption_trains_the_vit_at_the_new_size_and_not_the_llm(trained_tiny, tmp_path):
    proc = _finetune(trained_tiny, tmp_path, "--set", "train.steps=4", "--set", "train.save_every=4")
    assert proc.returncode == 0, proc.stderr[-3000:]
    init = blip2cli.load(str(trained_tiny / "runs" / "tiny-stage2" / "latest"), device="cpu", dtype="float32")
    tuned = blip2cli.load(str(tmp_path / "runs" / "tiny-caption" / "latest"), device="cpu", dtype="float32")
    assert init.config.vision.image_size == 64 and tuned.config.vision.image_size == 80  # positions resampled
    before, after = init.net.state_dict(), tuned.net.state_dict()
    assert after["vision.trunk.pos_embed"].shape[1] == (80 // init.config.vision.patch_size) ** 2 + 1
    block = "vision.trunk.blocks.0.mlp.fc1.weight"
    assert not torch.equal(before[block], after[block])  # the ViT was trained
    assert not torch.equal(before["language_projection.weight"], after["language_projection.weight"])
    llm = [k for k in before if k.startswith("language_model.")]
    assert llm and all(torch.equal(before[k], after[k]) for k in llm)  # the LLM was not
    assert tuned.checkpoint.generation == "caption-coco"  # it decodes as the COCO-finetuned models do
    texts = tuned.generate([str(p) for p in sorted((tmp_path / "runs" / "tiny-caption" / "samples").glob("*.png"))][:2],
                           max_new_tokens=4)
    assert len(texts) == 2


@pytest.mark.slow
def test_finetune_caption_lowers_the_heldout_loss(trained_tiny, tmp_path):
    proc = _finetune(trained_tiny, tmp_path, "--set", "train.steps=120", "--set", "train.save_every=120")
    assert proc.returncode == 0, proc.stderr[-3000:]
    init = blip2cli.load(str(trained_tiny / "runs" / "tiny-stage2" / "latest"), device="cpu", dtype="float32")
    tuned = blip2cli.load(str(tmp_path / "runs" / "tiny-caption" / "latest"), device="cpu", dtype="float32")
    assert heldout_loss(tuned) < 0.5 * heldout_loss(init)  # measured: 4.56 -> 0.89


@pytest.mark.parametrize("args, message", [
    (["--init", "STAGE1"], "not a stage-2 (image-to-text) model"),
    (["--set", "model.image_size=81"], "not a multiple of the tower's patch size"),
    (["--init", "runs/nothing/latest"], "no such run directory or checkpoint"),
])
def test_finetune_caption_bad_input_is_one_line(trained_tiny, tmp_path, args, message):
    if args[:2] == ["--init", "STAGE1"]:
        args = ["--init", str(trained_tiny / "runs" / "tiny-stage1" / "latest")]
    init = [] if args[0] == "--init" else ["--init", str(trained_tiny / "runs" / "tiny-stage2" / "latest")]
    proc = blip2("finetune", "caption", "--recipe", "tiny", *init, *args, "--out", "runs", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], proc.stderr


def test_flan_t5_caption_fine_tune_targets_the_whole_caption(hf_t5):
    """With ``whole_caption`` the encoder reads the prompt alone and the decoder's target is the whole caption (the
    authors' Flan-T5 COCO fine-tune); without it, stage 2's prefix LM splits the caption between the two."""
    from blip2cli.train.tasks import Stage2Loss, Stage2Task

    model = blip2cli.load(str(hf_t5), device="cpu", dtype="float32")
    tok = model.checkpoint.tokenizer
    captions = ["a red circle on a grey table", "two blue squares side by side"]
    tuned = Stage2Task(model.net, tok, Stage2Loss(prompt="a photo of", whole_caption=True))
    enc_ids, enc_mask, labels, _ = tuned.prefix_lm_inputs(captions, 0, torch.device("cpu"))
    assert (enc_ids == torch.tensor(tok(["a photo of"] * 2).input_ids)).all()
    assert [[t for t in row if t != -100] for row in labels.tolist()] == tok(captions).input_ids
    pretraining = Stage2Task(model.net, tok, Stage2Loss(prompt="a photo of"))
    _, _, split_labels, _ = pretraining.prefix_lm_inputs(captions, 0, torch.device("cpu"))
    assert [[t for t in row if t != -100] for row in split_labels.tolist()] != tok(captions).input_ids


def test_finetune_retrieval_through_the_cli_saves_a_stage1_model_with_the_trained_vit(trained_tiny, tmp_path):
    init = trained_tiny / "runs" / "tiny-stage1" / "latest"
    proc = blip2("finetune", "retrieval", "--recipe", "tiny", "--init", str(init), "--out", "runs",
                 "--set", "train.steps=2", "--set", "train.save_every=2", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    before = blip2cli.load(str(init), device="cpu", dtype="float32")
    tuned = blip2cli.load(str(tmp_path / "runs" / "tiny-retrieval" / "latest"), device="cpu", dtype="float32")
    assert not tuned.can_generate and tuned.config.vision.image_size == 80
    block = "vision.trunk.blocks.0.mlp.fc1.weight"
    assert not torch.equal(before.net.state_dict()[block], tuned.net.state_dict()[block])
    from blip2cli.data.synthetic import ShapesDataset

    ShapesDataset("heldout", size=6, image_size=80).write_images(tmp_path / "heldout")
    proc = blip2("eval", "coco-retrieval", "--model", str(tmp_path / "runs" / "tiny-retrieval" / "latest"),
                 "--annotations", str(tmp_path / "heldout" / "annotations.json"), "--images",
                 str(tmp_path / "heldout"), "--device", "cpu", "--json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]  # texts cut at the tiny Q-Former's 32 positions, not 35
    assert json.loads(proc.stdout)["num_images"] == 6
    proc = blip2("finetune", "retrieval", "--recipe", "tiny", "--init", str(trained_tiny / "runs" / "tiny-stage2" /
                 "latest"), "--out", "runs", cwd=tmp_path)
    assert proc.returncode == 2 and "not a stage-1 model" in proc.stderr, proc.stderr


def test_epochs_are_counted_from_the_data_and_steps_replace_them(tmp_path):
    """``train.epochs`` gives ceil(epochs x samples / global batch) steps, the samples counted from the annotation
    files; ``--set train.steps=N`` on an epochs recipe replaces its epochs (and the other way round)."""
    from blip2cli.config import load_recipe
    from blip2cli.train.loop import build_data, run_length
    from blip2cli.train.recipe import PretrainRecipe
    from blip2cli.train.run import finetune_recipe, one_length

    (tmp_path / "a.json").write_text(json.dumps([{"image": f"{i}.jpg", "caption": "x"} for i in range(1000)]))
    source = f"data.sources=[{{kind: caption_json, path: {tmp_path / 'a.json'}, image_root: {tmp_path}}}]"
    spec = load_recipe(PretrainRecipe, "finetune/caption_coco_opt-2.7b", [source])
    assert spec.train.epochs == 5 and spec.train.steps is None
    assert run_length(spec, build_data(spec, 0, 16).sources, world=16) == 20  # ceil(5 x 1000 / (16 x 16))
    spec = load_recipe(PretrainRecipe, "finetune/caption_coco_opt-2.7b", one_length([source, "train.steps=7"]))
    assert run_length(spec, build_data(spec, 0, 16).sources, world=16) == 7 and spec.train.epochs is None
    assert load_recipe(PretrainRecipe, "tiny/caption", one_length(["train.epochs=2"])).train.steps is None
    assert finetune_recipe("caption", "blip2-flan-t5-xl") == "finetune/caption_coco_flant5-xl"
    assert finetune_recipe("vqa", "blip2-opt-6.7b") == "finetune/vqa_vqav2_opt-6.7b"
    assert finetune_recipe("retrieval", "lavis-stage1-vit-l") == "finetune/retrieval_coco_vit-l"
    assert finetune_recipe("caption", "runs/mine/latest") == "finetune/caption_coco_opt-2.7b"
