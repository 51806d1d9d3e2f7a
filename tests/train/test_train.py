"""Pretraining: recipes, schedule, the tiny pipeline end to end, and exact resume after a kill."""

from __future__ import annotations

import json
import math
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

import blip2cli
from blip2cli.config import load_recipe, recipes_root
from blip2cli.runtime.errors import Blip2Error
from blip2cli.train.recipe import PretrainRecipe, deepspeed_config
from blip2cli.train.schedule import lr_at, param_groups

from tests.helpers import (BLIP2, blip2, cli_env, straight_and_killed_runs, tensorboard_scalars,
                           wandb_offline_history)


def test_every_pretrain_recipe_loads():
    names = sorted(str(p.relative_to(recipes_root()).with_suffix("")) for p in
                   [*recipes_root().glob("pretrain/*.yaml"), *recipes_root().glob("tiny/*.yaml")])
    assert len(names) >= 8
    for name in names:
        recipe = load_recipe(PretrainRecipe, name)
        assert recipe.stage in name
    paper = load_recipe(PretrainRecipe, "pretrain/stage1_eva-g")
    assert (paper.train.steps, paper.train.global_batch, paper.optim.betas) == (250_000, 1680, [0.9, 0.98])
    ds = deepspeed_config(paper, world_size=16)
    assert ds["train_batch_size"] == 1680 and ds["zero_optimization"]["overlap_comm"] is True  # zero2 preset
    s2 = load_recipe(PretrainRecipe, "pretrain/stage2_flant5-xl")
    assert (s2.train.steps, s2.train.global_batch, s2.optim.min_lr) == (80_000, 1520, 5e-5)
    with pytest.raises(Blip2Error, match="global_batch 1680 != batch_size 105"):
        deepspeed_config(paper, world_size=8)


def test_recipe_errors_suggest_the_key():
    with pytest.raises(Blip2Error, match="unknown key 'stpes'; did you mean 'steps'"):
        load_recipe(PretrainRecipe, "tiny/stage1", ["train.stpes=3"])
    with pytest.raises(Blip2Error, match=r"train.precision 'fp8'"):
        load_recipe(PretrainRecipe, "tiny/stage1", ["train.precision=fp8"])


def test_warmup_then_cosine_to_the_minimum():
    kw = dict(lr=1e-4, min_lr=5e-5, warmup_lr=1e-6, warmup_steps=2000, total_steps=80_000)
    assert lr_at(0, **kw) == pytest.approx(1e-6)
    assert lr_at(1000, **kw) == pytest.approx(1e-6 + (1e-4 - 1e-6) / 2)
    assert lr_at(2000, **kw) == pytest.approx(1e-4)
    assert lr_at(41_000, **kw) == pytest.approx(5e-5 + 5e-5 * 0.5 * (1 + math.cos(math.pi / 2)))
    assert lr_at(80_000, **kw) == pytest.approx(5e-5)


def test_parameter_groups():
    from blip2cli.train.build import build_stage1

    task, _ = build_stage1(load_recipe(PretrainRecipe, "tiny/stage1"))
    decay, no_decay = param_groups(task, 0.05)
    names = {id(p): n for n, p in task.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    plain = {names[id(p)] for p in no_decay["params"]}
    assert "net.qformer.layers.0.self_attn.query.weight" in decayed
    assert {"net.temp", "net.qformer.query_tokens", "net.qformer.layers.0.self_attn.query.bias"} <= plain
    assert not any(n.startswith("net.vision.") for n in decayed | plain)  # the frozen tower is not trained
    lavis_style = param_groups(task, 0.05, decay_temp_and_queries=True)
    assert {"net.temp", "net.qformer.query_tokens"} <= {names[id(p)] for p in lavis_style[0]["params"]}


def test_vision_layer_decay_gives_each_block_its_rate():
    """With the ViT trained and a layer decay d, block i of n learns at lr x d^(n - i) and the embeddings at
    lr x d^(n + 1), in the optimiser the engine builds and after its step sets the rate; the rest at lr."""
    from dataclasses import replace

    from blip2cli.train.build import build_stage1
    from blip2cli.train.engine import TorchEngine

    recipe = load_recipe(PretrainRecipe, "tiny/stage1")
    recipe = replace(recipe, optim=replace(recipe.optim, vision_layer_decay=0.8))
    task, _ = build_stage1(recipe)
    task.net.vision.requires_grad_(True)
    depth = len(task.net.vision.trunk.blocks)
    engine = TorchEngine(task, recipe, torch.device("cpu"))
    batch = next(iter(tiny_stage1_batches(task, recipe)))
    engine.train_batch([batch], step=0, lr=0.5)
    rate = {id(p): group["lr"] for group in engine.optimizer.param_groups for p in group["params"]}
    named = dict(task.named_parameters())
    for i in range(depth):
        assert rate[id(named[f"net.vision.trunk.blocks.{i}.mlp.fc1.weight"])] == pytest.approx(0.5 * 0.8 ** (depth - i))
        assert rate[id(named[f"net.vision.trunk.blocks.{i}.norm1.bias"])] == pytest.approx(0.5 * 0.8 ** (depth - i))
    for stem in ("cls_token", "pos_embed", "patch_embed.proj.weight"):
        assert rate[id(named[f"net.vision.trunk.{stem}"])] == pytest.approx(0.5 * 0.8 ** (depth + 1))
    assert rate[id(named["net.qformer.layers.0.self_attn.query.weight"])] == 0.5
    assert rate[id(named["net.ln_vision.weight"])] == 0.5
    decayed = {id(p) for g in engine.optimizer.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    assert id(named["net.vision.trunk.blocks.0.mlp.fc1.weight"]) in decayed
    assert id(named["net.vision.trunk.blocks.0.mlp.fc1.bias"]) not in decayed


def tiny_stage1_batches(task, recipe):
    """One small stage-1 batch of the shapes set (images and captions)."""
    import random

    from blip2cli.data.synthetic import caption, render_shape
    from blip2cli.models.vision import image_transform

    size = task.net.config.vision.image_size
    transform = image_transform(size)
    scenes = [("red", "circle"), ("blue", "square"), ("green", "triangle"), ("yellow", "circle")]
    rng = random.Random(0)
    images = torch.stack([transform(render_shape(colour, shape, size, rng)) for colour, shape in scenes])
    yield {"image": images, "text": [caption(colour, shape) for colour, shape in scenes]}


def test_full_size_trainable_parameters():
    from dataclasses import replace

    from blip2cli.models.blip2 import Blip2Config, Blip2ImageToText, Blip2Stage1
    from blip2cli.models.components import TOWERS
    from blip2cli.models.qformer import QFormerConfig
    from transformers import OPTConfig

    opt = OPTConfig(hidden_size=2560, num_hidden_layers=32, ffn_dim=10240, num_attention_heads=32,
                    word_embed_proj_dim=2560, vocab_size=50272).to_dict()
    with torch.device("meta"):
        s1 = Blip2Stage1(Blip2Config(vision=TOWERS["eva-g"]))
        s2 = Blip2ImageToText(Blip2Config(vision=TOWERS["eva-g"], text=opt,
                                          qformer=replace(QFormerConfig(), has_text=False, has_lm_head=False)))
    trainable = lambda net: sum(p.numel() for n, p in net.named_parameters()  # noqa: E731
                                if not n.startswith(("vision.", "language_model.")))
    assert 186e6 < trainable(s1) < 189e6  # paper: 188M
    assert 105e6 < trainable(s2) < 109e6  # about 107M: the query path and the projection


@pytest.fixture(scope="module")
def tiny_runs(quickstart):
    """The README's quickstart (stage 1 then stage 2 of the tiny recipes, through the real CLI), run once."""
    return quickstart.root


@pytest.mark.slow
def test_tiny_stage1_retrieves_held_out_captions(tiny_runs):
    from blip2cli.data.synthetic import COLOURS, SHAPES, ShapesDataset, caption

    model = blip2cli.load(str(tiny_runs / "runs" / "tiny-stage1"), device="cpu", dtype="float32")
    held_out = ShapesDataset("heldout", size=60, image_size=64, seed=0)
    captions = [caption(c, s) for c in COLOURS for s in SHAPES]
    images = [held_out[i]["image"] for i in range(60)]
    best = model.itc(images, captions).argmax(dim=1).tolist()
    accuracy = sum(captions[j] == held_out[i]["text"] for i, j in enumerate(best)) / 60
    assert accuracy > 0.5  # chance: 1/12
    run = tiny_runs / "runs" / "tiny-stage1"
    assert {"recipe.yaml", "command.txt", "version.json", "metrics.jsonl", "latest"} <= {p.name for p in run.iterdir()}
    first, last = (json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()[::999][:2])
    assert last["loss"] < first["loss"]


@pytest.mark.slow
def test_tiny_stage2_names_colour_and_shape_of_new_images(tiny_runs, tmp_path):
    from blip2cli.data.synthetic import ShapesDataset

    held_out = ShapesDataset("heldout", size=24, image_size=64, seed=0)
    paths = held_out.write_images(tmp_path / "new", 24)
    proc = blip2("generate", *paths, "--model", "runs/tiny-stage2/latest", "--json", "--num-beams", "3",
                 cwd=tiny_runs, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    texts = [json.loads(line)["text"] for line in proc.stdout.splitlines()]
    truth = [held_out[i]["text"] for i in range(24)]
    accuracy = sum(t == g for t, g in zip(texts, truth)) / 24
    assert accuracy > 0.5, list(zip(texts, truth))  # chance: 1/12


def _final_weights(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(run / "latest" / "model.safetensors")


def _metrics(run: Path) -> dict[int, dict]:
    return {r["step"]: r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}


@pytest.mark.slow
def test_resume_after_sigkill_equals_a_straight_run(tmp_path):
    args = ["pretrain", "stage1", "--recipe", "tiny", "--out", "runs", "--set", "train.steps=40",
            "--set", "train.save_every=20", "--set", "train.log_every=1000", "--set", "train.loggers=[tensorboard]"]
    straight, run = straight_and_killed_runs(args, tmp_path, "step-000020")
    a, b = _metrics(straight), _metrics(run)
    # TensorBoard shows each step once: what the killed start wrote after step 20 is purged
    assert sorted(b) == list(range(1, 41))
    assert tensorboard_scalars(run / "tensorboard")["train/loss"] == [(s, pytest.approx(b[s]["loss"], rel=1e-6))
                                                                      for s in range(1, 41)]
    for step in range(21, 41):
        for key in ("loss", "itc", "itm", "itg", "lr"):
            assert b[step][key] == pytest.approx(a[step][key], rel=1e-5, abs=1e-6), (step, key)
    wa, wb = _final_weights(straight), _final_weights(run)
    assert wa.keys() == wb.keys()
    for k in wa:
        # A key bias adds the same amount to every attention score of a row: softmax ignores it, so its
        # gradient is rounding noise that Adam scales up. It has no effect on any output; skip it.
        if not k.endswith("key.bias"):
            torch.testing.assert_close(wb[k], wa[k], atol=1e-5, rtol=0, msg=k)


def test_sigterm_saves_a_checkpoint_and_exits_75_and_the_loggers_continue(tmp_path):
    """SIGTERM: a checkpoint at the end of the step, exit 75; the rerun continues the run's TensorBoard and W&B
    (offline) runs, which then hold each step of metrics.jsonl once, with its values."""
    args = ["pretrain", "stage1", "--recipe", "tiny", "--out", "runs", "--name", "term", "--set",
            "train.steps=100000", "--set", "train.save_every=100000", "--set", "train.loggers=[tensorboard,wandb]"]
    env = cli_env({"WANDB_MODE": "offline"})
    proc = subprocess.Popen([BLIP2, *args], cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True)
    run = tmp_path / "runs" / "term"
    metrics = run / "metrics.jsonl"
    deadline = time.time() + 300
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3) and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 75, err[-2000:]  # EX_TEMPFAIL: not done, so `stage1 && stage2` stops here
    latest = (run / "latest").resolve()
    step = int(latest.name.split("-")[1])
    assert step >= 3
    assert err.rstrip().splitlines()[-1] == (f"error: stopped at step {step}: checkpoint runs/term/{latest.name}; "
                                             "rerun the same command to continue")

    done = blip2(*args, "--set", f"train.steps={step + 3}", cwd=tmp_path, env={"WANDB_MODE": "offline"})
    assert done.returncode == 0, done.stderr[-2000:]
    rows = _metrics(run)
    assert sorted(rows) == list(range(1, step + 4))
    keys = [k for k in rows[1] if k != "step"]
    assert {"loss", "itc", "itm", "itg", "lr", "grad_norm", "samples_per_s", "tokens_per_s", "rss_gb"} <= set(keys)
    board = tensorboard_scalars(run / "tensorboard")
    for key in keys:
        assert [s for s, _ in board[f"train/{key}"]] == sorted(rows), key
        assert [v for _, v in board[f"train/{key}"]] == pytest.approx([rows[s][key] for s in sorted(rows)],
                                                                       rel=1e-6), key
    history = wandb_offline_history(run)
    run_id = json.loads((run / "wandb.json").read_text())["id"]
    assert {rid for rid, _ in history} == {run_id}  # one W&B run, continued
    assert len(list(run.glob("wandb/offline-run-*"))) == 2
    assert [r["_step"] for _, r in history] == sorted(rows)  # each step once, in order
    for _, r in history:
        assert {k: r[f"train/{k}"] for k in keys} == pytest.approx({k: rows[r["_step"]][k] for k in keys}, rel=1e-12)


def test_qformer_starts_from_bert(tmp_path):
    """Stage 1 initialises the Q-Former from BERT: both FFNs from BERT's, [DEC] appended, cross-attention new."""
    from transformers import BertConfig, BertForMaskedLM

    from blip2cli.train.build import build_stage1

    from tests import tiny

    tok = tiny.bert_tokenizer()
    bert = BertForMaskedLM(BertConfig(vocab_size=len(tok) - 1, hidden_size=32, num_hidden_layers=2,
                                      num_attention_heads=4, intermediate_size=64, max_position_embeddings=40))
    bert.save_pretrained(tmp_path / "bert")
    tok.save_pretrained(tmp_path / "bert")
    recipe = load_recipe(PretrainRecipe, "tiny/stage1", [
        f"model.qformer_init={tmp_path / 'bert'}", f"model.tokenizer={tmp_path / 'bert'}",
        "model.qformer.hidden_size=32", "model.qformer.num_layers=2", "model.qformer.intermediate_size=64",
        "model.qformer.max_position_embeddings=40"])
    net = build_stage1(recipe)[0].net
    ref = bert.state_dict()
    q = net.qformer
    torch.testing.assert_close(q.layers[1].self_attn.key.weight, ref["bert.encoder.layer.1.attention.self.key.weight"])
    for ffn in (q.layers[0].query_ffn, q.layers[0].text_ffn):
        torch.testing.assert_close(ffn.fc1.weight, ref["bert.encoder.layer.0.intermediate.dense.weight"])
        torch.testing.assert_close(ffn.norm.bias, ref["bert.encoder.layer.0.output.LayerNorm.bias"])
    assert q.layers[0].query_ffn.fc1.weight.data_ptr() != q.layers[0].text_ffn.fc1.weight.data_ptr()  # untied
    words = ref["bert.embeddings.word_embeddings.weight"]
    assert q.embeddings.word.weight.shape[0] == len(tok) == words.shape[0] + 1  # room for [DEC]
    torch.testing.assert_close(q.embeddings.word.weight[:-1], words)
    torch.testing.assert_close(q.lm_head.dense.weight, ref["cls.predictions.transform.dense.weight"])
    torch.testing.assert_close(q.embed_norm.weight, ref["bert.embeddings.LayerNorm.weight"])
    assert q.layers[0].cross_attn.key.weight.shape == (32, 64)  # from the tower width, randomly initialised
