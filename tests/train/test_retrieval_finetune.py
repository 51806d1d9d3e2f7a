"""Retrieval fine-tuning: COCO's captions paired by image (string ids, hashed the same in every process, positives
across ranks, never ITM negatives), LAVIS's multi-positive ITC, and ``build_retrieval`` from a tiny stage-1 model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from blip2cli.runtime.errors import Blip2Error
from blip2cli.train import losses
from blip2cli.train.tasks import Stage1Loss, Stage1Task
from tests import tiny
from tests.helpers import REPO
from tests.train.tiny_tasks import tiny_stage1

B = 4  # per rank
# COCO-style string ids, duplicates within a rank and across the two ranks (coco_1 three times, coco_2 twice)
IDS = [["coco_1", "coco_2", "coco_1", "coco_3"], ["coco_2", "coco_4", "coco_1", "coco_5"]]
# every caption distinct, so the only pairs kept from ITM negatives besides a row's own are the same-image ones
CAPTIONS = ["a red circle on a table", "two dogs playing in the park", "a yellow car", "the man is riding a horse",
            "a green square", "a blue triangle next to a house", "what colour is the sky", "the cat is on the table"]
STEPS = 8


def _global_batch() -> dict:
    """The two ranks' batches together. Items of one id get different pixels, as random crops give each caption's
    copy of an image (identical copies would make the multi-positive ITC sum to the per-pair one)."""
    from blip2cli.models.vision import image_transform

    t = image_transform(32)
    return {"image": torch.stack([t(tiny.draw_image(i)) for i in range(2 * B)]), "text": list(CAPTIONS),
            "image_id": IDS[0] + IDS[1]}


def _task(tokenizer_dir: str, same_image_positives: bool | None = True) -> Stage1Task:
    from transformers import AutoTokenizer

    net, tok = tiny_stage1(AutoTokenizer.from_pretrained(tokenizer_dir))
    net.vision.requires_grad_(False)
    settings = Stage1Loss(max_txt_len=16, same_image_positives=same_image_positives)
    return Stage1Task(net, tok, settings).eval()  # eval: no dropout, comparable runs


def _worker(rank: int, world: int, tokenizer_dir: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{out_dir}/rendezvous", rank=rank, world_size=world)
    task = _task(tokenizer_dir)
    full = _global_batch()
    part = {k: v[rank * B:(rank + 1) * B] for k, v in full.items()}
    drawn, sample = [], losses.sample_hard_negatives

    def spy(sim, positives, seeds):  # what the task excludes, and what it draws
        picks = sample(sim, positives, seeds)
        drawn.append((positives.clone(), picks.clone()))
        return picks

    losses.sample_hard_negatives = spy
    with torch.no_grad():
        itc = [task(part, step)["itc"] for step in range(STEPS)]
    mask = losses.positive_mask(B, losses.image_id_tensor(part["image_id"]))
    torch.save({"mask": mask, "drawn": drawn, "itc": itc[0]}, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()  # neither rank tears the group down while the other still talks to it
    dist.destroy_process_group()
    os._exit(0)  # skip interpreter teardown, where gloo's threads can abort a finished process


@pytest.mark.distributed
def test_same_image_pairs_are_positives_across_ranks_and_never_itm_negatives(tmp_path):
    tokenizer_dir = str(tmp_path / "bert")
    tiny.bert_tokenizer().save_pretrained(tokenizer_dir)
    mp.spawn(_worker, args=(2, tokenizer_dir, str(tmp_path)), nprocs=2, join=True)
    everyone = IDS[0] + IDS[1]
    itc = []
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        expected = torch.tensor([[mine == other for other in everyone] for mine in IDS[rank]])
        assert expected.sum() > B  # the batch does have same-image pairs beyond each row's own
        assert torch.equal(got["mask"], expected)
        assert len(got["drawn"]) == 2 * STEPS  # a negative image per text and a negative text per image, each step
        for excluded, picks in got["drawn"]:
            assert torch.equal(excluded, expected)  # distinct captions: only same-image pairs are excluded
            assert not expected[torch.arange(B), picks].any()
        itc.append(got["itc"])
    # the multi-positive ITC of two ranks is one process's with the whole batch
    whole = _task(tokenizer_dir)
    with torch.no_grad():
        one = whole(_global_batch(), 0)["itc"]
        per_pair = _task(tokenizer_dir, same_image_positives=None)(_global_batch(), 0)["itc"]
    torch.testing.assert_close((itc[0] + itc[1]) / 2, one, atol=1e-5, rtol=1e-5)
    assert abs(float(one - per_pair)) > 1e-3  # the shared positives change the loss


def test_image_id_hash_is_the_same_in_every_process():
    ids = ["coco_391895", "coco_1", 391895, "391895"]
    here = losses.image_id_tensor(ids)
    assert here.dtype == torch.int64 and len(set(here.tolist())) == len(ids)  # ints and strings hash apart
    code = ("import json, sys; from blip2cli.train.losses import image_id_tensor; "
            "print(json.dumps(image_id_tensor(json.loads(sys.argv[1])).tolist()))")
    for seed in ("1", "2"):  # Python's own str hash differs between these two processes
        proc = subprocess.run([sys.executable, "-c", code, json.dumps(ids)], capture_output=True, text=True,
                              check=False, cwd=REPO, env={**os.environ, "PYTHONHASHSEED": seed}, timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert json.loads(proc.stdout.splitlines()[-1]) == here.tolist()


def test_multi_positive_itc_is_lavis_soft_target_loss():
    torch.manual_seed(0)
    n, queries = 5, 3
    img = F.normalize(torch.randn(n, queries, 8), dim=-1)
    txt = F.normalize(torch.randn(n, 8), dim=-1)
    ids = ["coco_7", "coco_9", "coco_7", "coco_7", "coco_2"]
    positives = losses.positive_mask(n, losses.image_id_tensor(ids))
    loss, i2t, t2i = losses.itc_loss(img, txt, torch.tensor(0.1), 0.1, positives)
    sim = torch.tensor([[max(float(img[i, q] @ txt[t]) for q in range(queries)) / 0.1 for t in range(n)]
                        for i in range(n)])

    def soft_ce(logits):  # LAVIS: 0.9 * positives / their count + 0.1 * uniform, against log-softmax
        total = 0.0
        for r in range(n):
            logp = logits[r].log_softmax(0)
            same = [c for c in range(n) if ids[c] == ids[r]]
            total += -sum((0.9 * (c in same) / len(same) + 0.1 / n) * logp[c] for c in range(n))
        return total / n

    torch.testing.assert_close(i2t, sim)
    torch.testing.assert_close(t2i, sim.T)
    torch.testing.assert_close(loss, (soft_ce(sim) + soft_ce(sim.T)) / 2)
    one_positive, _, _ = losses.itc_loss(img, txt, torch.tensor(0.1), 0.1)
    assert abs(float(one_positive - loss)) > 1e-3


def test_pretraining_ignores_image_ids_unless_asked():
    net, tok = tiny_stage1()
    batch = {**_global_batch(), "image_id": ["same"] * 2 * B}
    plain = {k: v for k, v in batch.items() if k != "image_id"}
    pretraining = Stage1Task(net, tok, Stage1Loss(max_txt_len=16)).eval()
    with torch.no_grad():
        assert torch.equal(pretraining(batch, 0)["itc"], pretraining(plain, 0)["itc"])
    paired = Stage1Task(net, tok, Stage1Loss(max_txt_len=16, same_image_positives=True)).eval()
    with pytest.raises(Blip2Error, match="has no image_id"):
        paired(plain, 0)


# --- build_retrieval ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stage1_dir(tmp_path_factory):
    """A tiny stage-1 model as ``blip2 pretrain stage1 --recipe tiny`` saves it (64 px, patches of 8), untrained."""
    from blip2cli.config import load_recipe
    from blip2cli.models.formats.native import write_model
    from blip2cli.train.build import build_stage1
    from blip2cli.train.recipe import PretrainRecipe

    out = tmp_path_factory.mktemp("stage1")
    _, ckpt = build_stage1(load_recipe(PretrainRecipe, "tiny/stage1"))
    write_model(ckpt, out)
    return out


def _recipe(*overrides: str):
    from blip2cli.config import load_recipe
    from blip2cli.train.recipe import PretrainRecipe

    return load_recipe(PretrainRecipe, "tiny/retrieval", list(overrides))


def _shapes_batch(image_size: int) -> dict:
    from blip2cli.data.datasets import collate
    from blip2cli.data.synthetic import ShapesDataset
    from blip2cli.models.vision import image_transform

    batch = collate([ShapesDataset("train", size=6, image_size=image_size, transform=image_transform(image_size))[i]
                     for i in range(6)])
    batch["image_id"] = ["coco_1", "coco_2", "coco_1", "coco_3", "coco_2", "coco_4"]
    return batch


def _with_vision_source(monkeypatch):
    """``load_checkpoint`` as if the stage-1 model kept its frozen ViT by reference, as LAVIS's do (eva-g)."""
    from blip2cli.models import resolve

    load = resolve.load_checkpoint
    monkeypatch.setattr(resolve, "load_checkpoint",
                        lambda *a, **k: replace(load(*a, **k), frozen_sources={"vision": "eva-g"}))


def test_build_retrieval_resamples_positions_and_trains_everything(stage1_dir, tmp_path, monkeypatch):
    from blip2cli.models.blip2 import Blip2Stage1
    from blip2cli.models.components import resample_pos
    from blip2cli.models.formats.native import write_model
    from blip2cli.models.resolve import load_checkpoint
    from blip2cli.train.build import build_retrieval
    from blip2cli.train.engine import TorchEngine, make_engine

    start = load_checkpoint(str(stage1_dir), dtype=torch.float32).net.state_dict()
    _with_vision_source(monkeypatch)
    recipe = _recipe()
    task, ckpt = build_retrieval(recipe, str(stage1_dir))
    net = task.net
    assert isinstance(net, Blip2Stage1) and net.config.vision.image_size == 80
    assert task.settings.same_image_positives and net.config.qformer.max_txt_len == 8
    assert (ckpt.generation, ckpt.source, ckpt.frozen_sources) == (None, "retrieval", {})  # the ViT by value
    before = {k: v.clone() for k, v in net.state_dict().items()}
    pos = "vision.trunk.pos_embed"
    assert before[pos].shape[1] == (80 // 8) ** 2 + 1
    torch.testing.assert_close(before[pos], resample_pos(start[pos], net.config.vision, "test"))
    assert all(torch.equal(before[k], v) for k, v in start.items() if k != pos)  # everything else as loaded
    assert all(p.requires_grad and p.dtype == torch.float32 for p in net.parameters())

    engine = make_engine(task, recipe, torch.device("cpu"))
    assert isinstance(engine, TorchEngine)
    engine.train_batch([_shapes_batch(80)], step=0, lr=1e-3)
    after = net.state_dict()
    for key in ("vision.trunk.blocks.0.mlp.fc1.weight", pos, "ln_vision.weight", "vision_proj.weight",
                "text_proj.weight", "itm_head.weight", "temp", "qformer.query_tokens"):
        assert not torch.equal(before[key], after[key]), key

    write_model(ckpt, tmp_path)  # as the loop saves it: a stage-1 model at 80 px with the trained ViT
    saved = load_checkpoint(str(tmp_path), dtype=torch.float32)
    assert isinstance(saved.net, Blip2Stage1) and saved.config.vision.image_size == 80
    assert torch.equal(saved.net.state_dict()["vision.trunk.blocks.0.mlp.fc1.weight"],
                       after["vision.trunk.blocks.0.mlp.fc1.weight"])


def test_build_retrieval_with_a_frozen_vit_keeps_it(stage1_dir, monkeypatch):
    from blip2cli.train.build import build_retrieval
    from blip2cli.train.engine import make_engine

    _with_vision_source(monkeypatch)
    recipe = _recipe("model.train_vision=false", "model.image_size=64")
    task, ckpt = build_retrieval(recipe, str(stage1_dir))
    assert ckpt.frozen_sources == {"vision": "eva-g"}  # kept by reference, as it was not trained
    net = task.net
    before = {k: v.clone() for k, v in net.state_dict().items()}
    make_engine(task, recipe, torch.device("cpu")).train_batch([_shapes_batch(64)], step=0, lr=1e-3)
    after = net.state_dict()
    vision = [k for k in before if k.startswith("vision.")]
    assert vision and all(torch.equal(before[k], after[k]) for k in vision)
    assert not torch.equal(before["ln_vision.weight"], after["ln_vision.weight"])
    assert not torch.equal(before["itm_head.weight"], after["itm_head.weight"])


@pytest.mark.parametrize("init, overrides, message", [
    ("stage2", [], "not a stage-1 model"),
    ("stage1", ["model.image_size=81"], "not a multiple of the tower's patch size 8"),
    ("stage1", ["stage1.max_txt_len=40"], "has 32 text positions"),
    ("", [], "pass --init"),
])
def test_build_retrieval_bad_input_is_one_line(stage1_dir, hf_opt, init, overrides, message):
    from blip2cli.train.build import build_retrieval

    path = {"stage1": str(stage1_dir), "stage2": str(hf_opt), "": ""}[init]
    with pytest.raises(Blip2Error) as error:
        build_retrieval(_recipe(*overrides), path)
    assert message in str(error.value) and "\n" not in str(error.value)
