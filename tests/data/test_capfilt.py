"""CapFilt with a tiny random BLIP captioner and a tiny random open_clip CLIP: the kept captions are the top
two by a direct similarity computation, results do not depend on batching, a killed run resumes, and the
pretraining loader reads the output."""

from __future__ import annotations

import dataclasses
import io
import json
import shutil
import signal
import subprocess
import tarfile
import time
from pathlib import Path

import pytest
import torch
import webdataset as wds

from blip2cli.data.capfilt import CapFiltRecipe, read_samples, run_capfilt
from blip2cli.models.capfilt_captioner import Captioner, shared_image_cross_attention, strip_prompt
from blip2cli.models.sampling import NucleusSampler, row_seed, uniform_at
from blip2cli.models.clip_ranker import Ranker
from blip2cli.runtime.errors import Blip2Error

from tests import tiny
from tests.helpers import BLIP2, blip2, cli_env

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("capfilt-models")
    return tiny.make_blip_captioner(root / "blip"), tiny.make_open_clip(root / "clip")


def _png(i: int) -> bytes:
    buf = io.BytesIO()
    tiny.draw_image(i).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Two img2dataset-like shards: jpg/png + txt + json per sample, one undecodable image, one sample
    without a web caption."""
    root = tmp_path_factory.mktemp("web")
    layout = {"00000.tar": [0, 1, "broken", 2], "00001.tar": [3, 4, "nocaption"]}
    for name, items in layout.items():
        with wds.TarWriter(str(root / name)) as sink:
            for j, item in enumerate(items):
                key = f"{name[:5]}{j:04d}"
                if item == "broken":
                    sink.write({"__key__": key, "jpg": b"\xff\xd8\xff garbage", "txt": "a broken one",
                                "json": json.dumps({"url": "http://x/b.jpg", "caption": "a broken one"})})
                elif item == "nocaption":
                    sink.write({"__key__": key, "png": _png(5), "json": json.dumps({"url": "http://x/5.png"})})
                else:
                    caption = ["a red circle on a table", "a green square", "two dogs in the park", "a blue sky",
                               "a yellow car"][item]
                    sink.write({"__key__": key, "png": _png(item), "txt": caption,
                                "json": json.dumps({"url": f"http://x/{item}.png", "caption": caption,
                                                    "similarity": 0.31})})
    return root


def _recipe(models, **changes) -> CapFiltRecipe:
    captioner, clip = models
    base = CapFiltRecipe(captioner=str(captioner), ranker=str(clip), num_captions=5, max_length=16, min_length=12,
                         top_p=0.9, repetition_penalty=1.1, keep=2, batch_size=2, workers=0, seed=0)
    return dataclasses.replace(base, **changes)


def _outputs(out: Path) -> dict[str, dict]:
    found = {}
    for tar in sorted(out.glob("*.tar")):
        for sample in read_samples(tar):
            found[sample["__key__"]] = sample
    return found


def test_nucleus_sampler_draws_from_transformers_top_p_nucleus():
    """The nucleus is the set transformers' ``TopKLogitsWarper`` and ``TopPLogitsWarper`` keep, and draws
    follow the renormalised probabilities within it; a draw is a pure function of (row seed, step)."""
    from transformers import TopKLogitsWarper, TopPLogitsWarper

    torch.manual_seed(0)
    logits = torch.randn(64, 12) * 0.7  # every token has a few percent of the mass: 1000 draws see them all
    for top_p, top_k in ((0.3, 0), (0.9, 0), (0.9, 5), (0.5, 8)):
        kept = torch.isfinite(TopPLogitsWarper(top_p)(None, TopKLogitsWarper(top_k)(None, logits.clone())
                                                      if top_k else logits.clone()))
        sampler = NucleusSampler(top_p, torch.arange(64), top_k)
        drawn = torch.stack([sampler.draw(logits, torch.arange(64) + 1000 * k, 7) for k in range(1000)], dim=1)
        assert kept.gather(1, drawn).all()  # never outside the nucleus
        assert torch.equal(kept, torch.zeros_like(kept).scatter_(1, drawn, True))  # every nucleus token is drawn

    probs = torch.tensor([0.5, 0.25, 0.15, 0.1 - 1e-4, 1e-4])
    rows = 40000
    sampler = NucleusSampler(0.95, torch.arange(rows))  # the nucleus: the first four tokens
    picks = sampler(torch.zeros(rows, 7, dtype=torch.long), torch.log(probs).expand(rows, -1)).argmax(-1)
    freq = torch.bincount(picks, minlength=5).float() / rows
    assert torch.allclose(freq[:4], probs[:4] / probs[:4].sum(), atol=0.01), freq
    assert freq[4] == 0  # beyond the nucleus: never drawn
    top3 = NucleusSampler(0.95, torch.arange(rows), top_k=3)  # the top three, renormalised: all of their mass
    picks = top3(torch.zeros(rows, 7, dtype=torch.long), torch.log(probs).expand(rows, -1)).argmax(-1)
    freq = torch.bincount(picks, minlength=5).float() / rows
    assert torch.allclose(freq[:3], probs[:3] / probs[:3].sum(), atol=0.01) and freq[3:].sum() == 0, freq
    # a vanishing top-p keeps the most probable token only; most rows run out of proposals and are drawn sorted
    flat = torch.randn(64, 12) * 0.1
    tiny_p = NucleusSampler(1e-6, torch.arange(64), proposals=2)
    assert torch.equal(tiny_p.draw(flat, torch.arange(64), 3), flat.argmax(dim=-1))
    seeds = torch.arange(3)
    assert torch.equal(uniform_at(seeds, 7), uniform_at(seeds, 7))
    assert not torch.equal(uniform_at(seeds, 7, 1), uniform_at(seeds, 7, 2))
    assert not torch.equal(uniform_at(seeds, 7), uniform_at(seeds, 8))
    assert row_seed(0, "k", 1) != row_seed(0, "k", 2) and row_seed(0, "k", 1) == row_seed(0, "k", 1)


def test_sampling_at_vanishing_top_p_is_transformers_greedy_search(models):
    """With top-p so small that only the best token survives, sampling must equal transformers' own greedy
    ``BlipForConditionalGeneration.generate`` with the same prompt, lengths and repetition penalty."""
    from transformers import BlipForConditionalGeneration, BlipProcessor

    recipe = _recipe(models, top_p=1e-6, num_captions=3)
    captioner = Captioner(recipe.captioner, CPU, torch.float32)
    images = [tiny.draw_image(i) for i in range(3)]
    pixels = torch.stack([captioner.pixels(im) for im in images])
    seeds = torch.tensor([row_seed(0, str(i), j) for i in range(3) for j in range(3)])
    ours = captioner.sample(pixels, seeds, recipe)

    reference = BlipForConditionalGeneration.from_pretrained(recipe.captioner).eval()
    processor = BlipProcessor.from_pretrained(recipe.captioner)
    inputs = processor(images=images, text=[recipe.prompt] * 3, return_tensors="pt")
    ids = reference.generate(pixel_values=inputs["pixel_values"], input_ids=inputs["input_ids"],
                             max_length=recipe.max_length, min_length=recipe.min_length,
                             repetition_penalty=recipe.repetition_penalty, num_beams=1, do_sample=False)
    expected = [strip_prompt(t, recipe.prompt) for t in processor.batch_decode(ids, skip_special_tokens=True)]
    assert ours == [t for t in expected for _ in range(3)]
    assert len(set(expected)) > 1


def test_shared_image_cross_attention_equals_the_decoder_on_repeated_images(models):
    """Groups of rows attending to their image's keys and values computed once give the decoder's own logits
    on per-row copies of the image tokens; the decoder's modules are restored afterwards."""
    from transformers import BlipForConditionalGeneration

    model = BlipForConditionalGeneration.from_pretrained(models[0]).eval()
    decoder, group = model.text_decoder, 3
    torch.manual_seed(0)
    embeds = torch.randn(2, 5, model.config.text_config.encoder_hidden_size)
    ids = torch.randint(5, model.config.text_config.vocab_size, (2 * group, 4))
    originals = [layer.crossattention.self for layer in decoder.bert.encoder.layer]
    with torch.no_grad():
        expected = decoder(input_ids=ids, encoder_hidden_states=embeds.repeat_interleave(group, dim=0)).logits
        with shared_image_cross_attention(decoder, embeds):
            got = decoder(input_ids=ids, encoder_hidden_states=embeds).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert [layer.crossattention.self for layer in decoder.bert.encoder.layer] == originals


@pytest.mark.parametrize("top_k", [50, 0])
def test_an_image_leaves_the_batch_once_its_captions_have_ended(models, tmp_path, top_k):
    """Captions that end at different steps are still exactly transformers' ``generate`` with the same processors
    on a copy of the image per caption, while an image whose captions have all ended is no longer computed."""
    from transformers import BlipForConditionalGeneration, BlipProcessor, LogitsProcessorList

    path = tiny.make_endings_likely(Path(shutil.copytree(models[0], tmp_path / "blip")), 4.0)
    recipe = _recipe((path, models[1]), min_length=6, top_k=top_k)
    captioner = Captioner(recipe.captioner, CPU, torch.float32)
    images = [tiny.draw_image(i) for i in range(4)]
    n = recipe.num_captions
    pixels = torch.stack([captioner.pixels(im) for im in images])
    seeds = torch.tensor([row_seed(0, str(i), j) for i in range(4) for j in range(n)])
    rows = []
    hook = captioner.model.text_decoder.bert.embeddings.register_forward_hook(lambda m, i, o: rows.append(len(o)))
    ours = captioner.sample(pixels, seeds, recipe)
    hook.remove()

    reference = BlipForConditionalGeneration.from_pretrained(path).eval()
    processor = BlipProcessor.from_pretrained(path)
    inputs = processor(images=images, text=[recipe.prompt] * 4, return_tensors="pt")
    ids = reference.generate(pixel_values=inputs["pixel_values"].repeat_interleave(n, dim=0),
                             input_ids=inputs["input_ids"].repeat_interleave(n, dim=0),
                             max_length=recipe.max_length, min_length=recipe.min_length,
                             repetition_penalty=recipe.repetition_penalty, num_beams=1, do_sample=False,
                             logits_processor=LogitsProcessorList([NucleusSampler(recipe.top_p, seeds,
                                                                                  recipe.top_k)]))
    assert ours == [strip_prompt(t, recipe.prompt) for t in processor.batch_decode(ids, skip_special_tokens=True)]
    lengths = (ids != processor.tokenizer.pad_token_id).sum(dim=1)
    assert lengths.min() < lengths.max()  # captions end at different steps
    assert rows[1] == 4 * n and rows[-1] < 4 * n and all(r % n == 0 for r in rows[1:])  # whole images leave


def test_kept_captions_are_the_top_two_by_direct_clip_similarity(models, shards, tmp_path):
    import open_clip

    recipe = _recipe(models)
    out = tmp_path / "out"
    stats = run_capfilt(sorted(shards.glob("*.tar")), out, recipe, CPU, torch.float32)
    assert sorted((s["shard"], s["samples"], s["captioned"], s["unreadable"]) for s in stats) == \
        [("00000.tar", 4, 3, 1), ("00001.tar", 3, 3, 0)]

    clip, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{models[1]}")
    clip.eval()
    tokenizer = open_clip.get_tokenizer(f"local-dir:{models[1]}")
    captioner = Captioner(recipe.captioner, CPU, torch.float32)
    inputs = {s["__key__"]: s for tar in sorted(shards.glob("*.tar")) for s in read_samples(tar)}
    outputs = _outputs(out)
    assert set(outputs) == set(inputs) - {"000000002"}  # the undecodable image is skipped
    web_kept = 0
    for key, sample in outputs.items():
        original = inputs[key]
        for ext in ("png", "txt"):  # every input member passes through unchanged
            assert sample.get(ext) == original.get(ext)
        meta = json.loads(sample["json"])
        assert {k: v for k, v in meta.items() if k != "captions"} == json.loads(original["json"])
        from PIL import Image

        image = Image.open(io.BytesIO(original["png"])).convert("RGB")
        seeds = torch.tensor([row_seed(recipe.seed, key, j) for j in range(recipe.num_captions)])
        synthetic = captioner.sample(captioner.pixels(image)[None], seeds, recipe)
        web = original.get("txt", b"").decode()
        candidates = list(dict.fromkeys(t for t in [web, *synthetic] if t))  # empty and repeated texts go
        with torch.no_grad():
            img = torch.nn.functional.normalize(clip.encode_image(preprocess(image)[None]), dim=-1)
            txt = torch.nn.functional.normalize(clip.encode_text(tokenizer(candidates)), dim=-1)
        sims = (txt @ img[0]).tolist()
        ranked = sorted(zip(candidates, sims), key=lambda cs: -cs[1])[:2]
        assert [c["text"] for c in meta["captions"]] == [c for c, _ in ranked]
        assert [c["score"] for c in meta["captions"]] == pytest.approx([s for _, s in ranked], abs=1e-5)
        assert [c["source"] for c in meta["captions"]] == ["web" if c == web else "synthetic" for c, _ in ranked]
        web_kept += any(c["source"] == "web" for c in meta["captions"])
    assert sum(s["web_caption_kept"] for s in stats) == web_kept


def test_results_do_not_depend_on_batch_size_and_follow_the_seed(models, shards, tmp_path):
    inputs = sorted(shards.glob("*.tar"))
    runs = {}
    variants = {"b1": {"batch_size": 1}, "b3": {"batch_size": 3}, "seed1": {"batch_size": 3, "seed": 1}}
    for name, changes in variants.items():
        run_capfilt(inputs, tmp_path / name, _recipe(models, **changes), CPU, torch.float32)
        runs[name] = {k: json.loads(s["json"])["captions"] for k, s in _outputs(tmp_path / name).items()}
    assert runs["b1"].keys() == runs["b3"].keys()
    for key in runs["b1"]:
        assert [c["text"] for c in runs["b1"][key]] == [c["text"] for c in runs["b3"][key]]
        assert [c["score"] for c in runs["b1"][key]] == pytest.approx([c["score"] for c in runs["b3"][key]], abs=1e-5)
    assert runs["seed1"] != runs["b3"]


def test_ranks_split_the_shards(models, shards, tmp_path):
    inputs = sorted(shards.glob("*.tar"))
    recipe = _recipe(models)
    first = run_capfilt(inputs, tmp_path / "out", recipe, CPU, torch.float32, rank=0, world=2)
    second = run_capfilt(inputs, tmp_path / "out", recipe, CPU, torch.float32, rank=1, world=2)
    assert [s["shard"] for s in first] == ["00000.tar"] and [s["shard"] for s in second] == ["00001.tar"]


def test_pretraining_loader_samples_among_the_kept_captions(models, shards, tmp_path):
    from blip2cli.data import pre_caption, webdataset_samples

    out = tmp_path / "out"
    run_capfilt(sorted(shards.glob("*.tar")), out, _recipe(models), CPU, torch.float32)
    kept = {k: {pre_caption(c["text"], 50) for c in json.loads(s["json"])["captions"]}
            for k, s in _outputs(out).items()}
    assert all(len(texts) == 2 for texts in kept.values())
    seen: dict[str, set[str]] = {}
    data = webdataset_samples(str(out), transform=None, shuffle=0)
    for epoch in range(16):
        data.set_epoch(epoch)
        for sample in data:
            seen.setdefault(sample["key"], set()).add(sample["text"])
    assert seen == kept


def _cli(models, shards: Path, out: Path, *extra: str) -> list[str]:
    """The arguments of ``blip2 prepare capfilt`` with the tiny models and small settings."""
    return ["prepare", "capfilt", str(shards), "--out", str(out), "--captioner", str(models[0]), "--ranker",
            str(models[1]), "--set", "num_captions=5", "--set", "max_length=16", "--set", "min_length=12",
            "--set", "workers=0", "--batch-size", "1", "--device", "cpu", *extra]


@pytest.mark.slow
def test_cli_killed_run_resumes_to_the_same_output(models, shards, tmp_path):
    many = tmp_path / "many"
    many.mkdir()
    for i in range(4):  # four shards, so that a kill after the first leaves work to resume
        (many / f"{i:05d}.tar").write_bytes((shards / "00000.tar").read_bytes())
    reference = tmp_path / "reference"
    proc = blip2(*_cli(models, many, reference, "--json"), timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads(proc.stdout)
    assert (summary["shards"], summary["samples"], summary["captioned"], summary["unreadable"]) == (4, 16, 12, 4)

    out = tmp_path / "resumed"
    victim = subprocess.Popen([BLIP2, *_cli(models, many, out)], env=cli_env(), stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not list(out.glob("*_capfilt.json")) and time.time() < deadline and victim.poll() is None:
        time.sleep(0.01)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    done_at_kill = len(list(out.glob("*_capfilt.json")))
    assert 1 <= done_at_kill < 4
    first_done = {p: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    proc = blip2(*_cli(models, many, out, "--json"), timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout)["captioned"] == 12
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary file left behind
    for p, mtime in first_done.items():  # finished shards were not redone
        assert p.stat().st_mtime_ns == mtime
    for name in (f"{i:05d}.tar" for i in range(4)):
        assert (out / name).read_bytes() == (reference / name).read_bytes()


def test_cli_errors_are_one_line(models, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = blip2(*_cli(models, empty, tmp_path / "o"), timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [f"error: no .tar shards found in {empty}"]
    shard = tmp_path / "s.tar"
    with tarfile.open(shard, "w"):
        pass
    proc = blip2("prepare", "capfilt", shard, "--out", tmp_path / "o", "--ranker", "no-such-ranker", "--captioner",
                 models[0], timeout=120)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert "no-such-ranker" in proc.stderr


def test_registry_names_resolve_offline_with_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(Blip2Error, match="Salesforce/blip-image-captioning-large.*hf download"):
        Captioner("blip-large-captioner", CPU, torch.float32)
    with pytest.raises(Blip2Error, match="timm/vit_large_patch14_clip_224.openai.*hf download"):
        Ranker("clip-vit-l-14", CPU, torch.float32)


@pytest.mark.distributed
def test_two_ranks_under_torchrun_match_one_process(models, shards, tmp_path):
    reference = tmp_path / "one"
    run_capfilt(sorted(shards.glob("*.tar")), reference, _recipe(models, batch_size=1), CPU, torch.float32)
    out = tmp_path / "two"
    proc = blip2(*_cli(models, shards, out, "--json"), ranks=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["captioned"] == 6  # rank 0 reports, after both finished
    ours, theirs = _outputs(out), _outputs(reference)
    assert ours.keys() == theirs.keys()
    for key in ours:
        a, b = json.loads(ours[key]["json"])["captions"], json.loads(theirs[key]["json"])["captions"]
        assert [c["text"] for c in a] == [c["text"] for c in b]
        assert [c["score"] for c in a] == pytest.approx([c["score"] for c in b], abs=1e-5)


def test_an_unreadable_shard_is_skipped_and_reported_after_the_others(models, shards, tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    (inputs / "00000.tar").write_bytes((shards / "00000.tar").read_bytes()[:700])  # cut inside a member
    (inputs / "00001.tar").write_bytes((shards / "00001.tar").read_bytes())
    out = tmp_path / "out"
    proc = blip2(*_cli(models, inputs, out, "--json"), timeout=300)
    assert proc.returncode == 2
    assert json.loads(proc.stdout)["captioned"] == 3  # the readable shard was done
    error = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "00000.tar: not a readable tar shard" in error[0] and "rerun" in error[0]
    assert (out / "00001_capfilt.json").exists() and not (out / "00000.tar").exists()


def test_decoding_passes_the_cache_under_its_supported_name(models, monkeypatch):
    """The decode loop (prefill and steps) hands the decoder its cache under the name current transformers
    take, not the deprecated ``past_key_values`` (removed in transformers 5.40): no FutureWarning."""
    import warnings

    recipe = _recipe(models, num_captions=2, min_length=3)
    assert len(recipe.prompt.split()) >= 2  # a prompt long enough for the prefill pass too
    captioner = Captioner(recipe.captioner, CPU, torch.float32)
    pixels = torch.stack([captioner.pixels(tiny.draw_image(i)) for i in range(2)])
    seeds = torch.tensor([row_seed(0, str(i), j) for i in range(2) for j in range(2)])
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        captions = captioner.sample(pixels, seeds, recipe)
    assert len(captions) == 4
