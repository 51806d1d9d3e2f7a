"""Retrieval: the k re-ranking path against a brute-force ITM ranking of every pair."""

from __future__ import annotations

import pytest
import torch

import blip2cli
from blip2cli.config import load_recipe
from blip2cli.eval.retrieval import RetrievalEval, recall_metrics, retrieval_scores

from tests.helpers import blip2

TEXTS = ["a red circle on a table", "two dogs are playing", "a yellow car parked", "the man riding a horse",
         "a green square", "a blue triangle next to a square", "what colour is the sky", "a photo of a cat",
         "a picture of the beach at sunset", "two dogs in the park with a ball"]


@pytest.fixture(scope="module")
def setup(hf_itm, image_files):
    model = blip2cli.load(str(hf_itm), device="cpu", dtype="float32")
    images = [str(p) for p in image_files[:5]]
    img2txt = [[2 * i, 2 * i + 1] for i in range(5)]
    txt2img = [t // 2 for t in range(10)]
    return model, images, img2txt, txt2img


def brute_force(model, images):
    """Every pair through ITM (mean class-1 logit) plus ITC, computed pair by pair."""
    net = model.matching_network()
    itc = model.itc(images, TEXTS)
    enc = model.checkpoint.qformer_tokenizer(TEXTS, padding="max_length", truncation=True, max_length=35,
                                             return_tensors="pt")
    full = torch.zeros(len(images), len(TEXTS))
    with torch.no_grad():
        for i, image in enumerate(images):
            embeds = model.image_embeds([image])
            for t in range(len(TEXTS)):
                full[i, t] = net.itm_logits(embeds, enc.input_ids[t:t + 1], enc.attention_mask[t:t + 1])[0, 1]
    return full + itc, itc


def test_reranking_with_k_covering_everything_equals_brute_force(setup):
    model, images, img2txt, txt2img = setup
    scores = retrieval_scores(model, images, TEXTS, k=128, batch_size=2, itm_batch=7)
    full, itc = brute_force(model, images)
    for i in range(len(images)):
        assert scores.image_ranking(i) == full[i].argsort(descending=True).tolist()
    for t in range(len(TEXTS)):
        assert scores.text_ranking(t) == full[:, t].argsort(descending=True).tolist()
    # ... and re-ranking matters: ITM moves texts against the ITC order somewhere
    assert any(scores.image_ranking(i) != itc[i].argsort(descending=True).tolist() for i in range(len(images)))
    brute = recall_metrics(_dense(full), img2txt, txt2img)
    assert recall_metrics(scores, img2txt, txt2img) == brute


def _dense(full):
    from blip2cli.eval.retrieval import RetrievalScores

    n, t = full.shape
    return RetrievalScores(torch.arange(t).expand(n, t), full, torch.arange(n).expand(t, n), full.T)


def test_small_k_keeps_the_itc_top_k(setup):
    model, images, img2txt, txt2img = setup
    scores = retrieval_scores(model, images, TEXTS, k=3, batch_size=2)
    itc = model.itc(images, TEXTS)
    for i in range(len(images)):
        assert set(scores.image_ranking(i)) == set(itc[i].topk(3).indices.tolist())
    for t in range(len(TEXTS)):
        assert set(scores.text_ranking(t)) == set(itc[:, t].topk(3).indices.tolist())
    metrics = recall_metrics(scores, img2txt, txt2img)
    assert set(metrics) >= {"txt_r1", "txt_r5", "txt_r10", "img_r1", "img_r5", "img_r10", "r_mean"}


def test_flickr30k_command(setup, hf_itm, tmp_path):
    import json
    from pathlib import Path

    _, images, img2txt, _ = setup
    split = [{"image": Path(images[i]).name, "caption": [TEXTS[t] for t in img2txt[i]]} for i in range(5)]
    (tmp_path / "test.json").write_text(json.dumps(split))
    proc = blip2("eval", "flickr30k", "--model", hf_itm, "--images", Path(images[0]).parent, "--annotations",
                 "test.json", "--k", "4", "--json", "--device", "cpu", "--name", "f", "--paper", "blip2-itm-vit-g-coco",
                 cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout)
    assert result["num_images"] == 5 and result["num_texts"] == 10 and result["k"] == 4
    figures = load_recipe(RetrievalEval, "eval/flickr30k").paper.models["blip2-itm-vit-g-coco"].figures
    assert result["paper"]["figures"] == figures and set(figures) == set(result["paper"]["difference"])
    assert all(result["paper"]["difference"][m] == pytest.approx(result[m] - figures[m], abs=1e-6) for m in figures)
    saved = json.loads((tmp_path / "runs" / "f" / "results.json").read_text())
    assert saved == {**result, "benchmark": "flickr30k", "model": {"label": Path(hf_itm).name,
                                                                   "source": str(Path(hf_itm).resolve())}}


@pytest.mark.distributed
def test_two_ranks_give_the_same_retrieval_metrics(setup, hf_itm, tmp_path):
    import json
    from pathlib import Path

    _, images, img2txt, _ = setup
    split = [{"image": Path(images[i]).name, "caption": [TEXTS[t] for t in img2txt[i]]} for i in range(5)]
    (tmp_path / "test.json").write_text(json.dumps(split))
    args = ["eval", "flickr30k", "--model", hf_itm, "--images", Path(images[0]).parent, "--annotations", "test.json",
            "--k", "3", "--json", "--device", "cpu", "--batch-size", "2"]
    one = blip2(*args, "--name", "one", cwd=tmp_path, env={"OMP_NUM_THREADS": "1"})  # one thread, as each rank
    assert one.returncode == 0, one.stderr[-2000:]
    two = blip2(*args, "--name", "two", cwd=tmp_path, ranks=2)
    assert two.returncode == 0, two.stderr[-2000:]
    assert json.loads(two.stdout) == json.loads(one.stdout)


def test_a_killed_retrieval_continues_without_recomputing(setup, tmp_path):
    model, images, _, _ = setup
    net = model.matching_network()
    straight = retrieval_scores(model, images, TEXTS, k=4, batch_size=2)
    calls = []
    original = net.itm_logits

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # killed while scoring the second image batch
        return original(*args, **kwargs)

    net.itm_logits = failing
    with pytest.raises(KeyboardInterrupt):
        retrieval_scores(model, images, TEXTS, k=4, batch_size=2, itm_batch=1000, work_dir=tmp_path)
    assert (tmp_path / "itc.pt").exists() and (tmp_path / "itm.rank000.pt").exists()
    net.itm_logits = lambda *a, **k: calls.append(1) or original(*a, **k)
    embeds = []
    original_embeds = model.image_embeds
    model.image_embeds = lambda imgs: embeds.append(len(imgs)) or original_embeds(imgs)
    calls.clear()
    try:
        again = retrieval_scores(model, images, TEXTS, k=4, batch_size=2, itm_batch=1000, work_dir=tmp_path)
    finally:
        net.itm_logits, model.image_embeds = original, original_embeds
    assert sum(embeds) == 3  # only the image batches not yet scored: ITC came from the cache
    assert len(calls) == 2  # one ITM call per remaining batch (batches of 2, 2 and 1 images; one was done)
    for a, b in ((again.i2t_score, straight.i2t_score), (again.t2i_score, straight.t2i_score)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    assert torch.equal(again.i2t_index, straight.i2t_index) and torch.equal(again.t2i_index, straight.t2i_index)
