"""Pretraining data: caption cleaning, transforms, synthetic shapes, annotation files, shards, mixture."""

from __future__ import annotations

import io
import json
import random
from collections import Counter
from itertools import islice

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset

from blip2cli.data import (
    COLOURS,
    SHAPES,
    CaptionJsonDataset,
    Mixture,
    ShapesDataset,
    collate,
    pre_caption,
    pre_question,
    render_shape,
    train_transform,
    webdataset_samples,
)
from blip2cli.data.synthetic import RGB
from blip2cli.runtime.errors import Blip2Error
from blip2cli.models.vision import CLIP_MEAN, CLIP_STD, image_transform

# --- text ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw, expected",
    [
        ('  A man (with a HAT) said: "Hi!!" ~ end.\n', "a man with a hat said hi end"),
        ("It's a dog-friendly, sunny day? #1;2*3", "it's a dog-friendly, sunny day? 1 2 3"),
        ("A cat\n", "a cat"),  # one trailing newline: rstrip, not the whitespace collapse
        ("A\tcat", "a\tcat"),  # a single tab is not collapsed (LAVIS only collapses runs of 2+)
        ("...", ""),
    ],
)
def test_pre_caption_matches_lavis(raw, expected):
    assert pre_caption(raw) == expected


def test_pre_caption_truncates_then_prepends_prompt():
    assert pre_caption("One two. Three four five", max_words=3) == "one two three"
    assert pre_caption("A Dog.", prompt="a photo of ") == "a photo of a dog"


def test_pre_question_deletes_characters():
    assert pre_question("What's on the table?? (Be brief.)") == "what's on the table?? be brief"
    assert pre_question("Is it  red. ") == "is it  red"  # deleted, not replaced: no collapse of the double space
    assert pre_question("U.S.A. or not?") == "usa or not?"
    assert pre_question("one two three four", max_words=2) == "one two"


# --- transforms ------------------------------------------------------------------------------------


def _gradient(width: int = 80, height: int = 60) -> Image.Image:
    x = np.linspace(0, 255, width, dtype=np.uint8)[None, :].repeat(height, 0)
    y = np.linspace(0, 255, height, dtype=np.uint8)[:, None].repeat(width, 1)
    return Image.fromarray(np.stack([x, y, np.full_like(x, 128)], -1))


def test_train_transform_shape_normalisation_and_randomness():
    transform = train_transform(32)
    white = transform(Image.new("L", (50, 40), 255))  # grey-scale input is converted to RGB
    assert white.shape == (3, 32, 32)
    expected = torch.tensor([(1 - m) / s for m, s in zip(CLIP_MEAN, CLIP_STD)])
    assert torch.allclose(white.mean((1, 2)), expected, atol=1e-4)

    image = _gradient()
    outputs, flipped = [], []
    for seed in range(24):
        torch.manual_seed(seed)
        out = transform(image)
        outputs.append(out)
        flipped.append(bool(out[0, :, 0].mean() > out[0, :, -1].mean()))  # red grows left to right
    torch.manual_seed(3)
    assert torch.equal(transform(image), outputs[3])
    assert any(flipped) and not all(flipped)
    # crops vary too: more distinct outputs than the two flips could give
    assert len({tuple(o.flatten()[::97].tolist()) for o in outputs}) > 2


# --- synthetic shapes ------------------------------------------------------------------------------


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image).astype(np.int64)


def test_shapes_deterministic_and_captioned():
    ds = ShapesDataset("train", size=24, image_size=48, seed=1)
    again = ShapesDataset("train", size=24, image_size=48, seed=1)
    other_seed = ShapesDataset("train", size=24, image_size=48, seed=2)
    assert ds[5]["image"].tobytes() == again[5]["image"].tobytes()
    assert ds[5]["image"].tobytes() != other_seed[5]["image"].tobytes()
    items = [ds[i] for i in range(len(ds))]
    assert {(it["colour"], it["shape"]) for it in items[:12]} == {(c, s) for c in COLOURS for s in SHAPES}
    for i, it in enumerate(items):
        assert it["text"] == f"a {it['colour']} {it['shape']}"
        assert it["image_id"] == i and it["image"].size == (48, 48)
    with pytest.raises(IndexError):
        ds[24]
    a, b = (render_shape("red", "square", 32, random.Random(7)) for _ in range(2))
    assert a.tobytes() == b.tobytes()
    with pytest.raises(ValueError, match="purple"):
        render_shape("purple", "square", 32, random.Random(0))


def test_shapes_heldout_is_new_renderings_of_the_same_combinations():
    train = ShapesDataset("train", size=48)
    heldout = ShapesDataset("heldout", size=12)
    train_images = {train[i]["image"].tobytes() for i in range(48)}
    combos = set()
    for i in range(12):
        item = heldout[i]
        combos.add((item["colour"], item["shape"]))
        assert item["image"].tobytes() not in train_images
        assert (item["colour"], item["shape"]) == (train[i]["colour"], train[i]["shape"])
    assert len(combos) == 12


def test_rendered_shape_has_the_captioned_colour_and_form():
    protos = np.array([RGB[c] for c in COLOURS])
    ds = ShapesDataset("train", size=48, image_size=64)
    fills = {s: [] for s in SHAPES}
    for i in range(len(ds)):
        item = ds[i]
        a = _pixels(item["image"])
        grey = a.max(-1) - a.min(-1) < 30
        background = {tuple(p) for p in a[grey].tolist()}
        assert len(background) == 1, "one plain grey background"
        assert np.sqrt(((np.array(background.pop()) - protos) ** 2).sum(-1)).min() > 100  # far from any shape colour
        nearest = ((a[:, :, None, :] - protos) ** 2).sum(-1).argmin(-1)[~grey]
        counts = Counter(COLOURS[k] for k in nearest.tolist())
        assert set(counts) == {item["colour"]}  # the only non-background colour, no other
        fraction = counts[item["colour"]] / grey.size
        assert 0.04 < fraction < 0.66
        ys, xs = np.nonzero(~grey)
        fills[item["shape"]].append(len(ys) / ((np.ptp(ys) + 1) * (np.ptp(xs) + 1)))
    # share of its bounding box the shape fills: square 1, circle pi/4, triangle 1/2
    assert min(fills["square"]) > 0.97
    assert all(0.72 < f < 0.84 for f in fills["circle"])
    assert all(0.45 < f < 0.6 for f in fills["triangle"])


def test_shapes_transform_and_write_images(tmp_path):
    ds = ShapesDataset("heldout", size=6, image_size=40, transform=image_transform(32))
    assert ds[0]["image"].shape == (3, 32, 32)
    paths = ds.write_images(tmp_path / "heldout", 4)
    assert [p.name for p in paths] == [f"heldout_{i:05d}.png" for i in range(4)]
    assert Image.open(paths[2]).tobytes() == ds.render(2).tobytes()
    back = CaptionJsonDataset(tmp_path / "heldout" / "annotations.json", tmp_path / "heldout")
    assert [back[i]["text"] for i in range(4)] == [ds[i]["text"] for i in range(4)]


# --- annotation files ------------------------------------------------------------------------------


def _save(path, colour=(200, 10, 10), size=(20, 16)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


def test_caption_json_lavis_layout_skips_missing_and_corrupt_images(tmp_path):
    _save(tmp_path / "img" / "a.png")
    _save(tmp_path / "img" / "c.jpg", (0, 0, 255))
    (tmp_path / "img" / "d.png").write_bytes(b"not a png at all")
    ann = [
        {"image": "img/a.png", "caption": "A RED square!", "image_id": "x1"},
        {"image": "img/missing.png", "caption": "gone"},
        {"image": "img/d.png", "caption": "corrupt"},
        {"image": "img/c.jpg", "caption": "Blue (very) blue."},
    ]
    (tmp_path / "ann.json").write_text(json.dumps(ann))
    ds = CaptionJsonDataset(tmp_path / "ann.json", tmp_path, transform=image_transform(24))
    assert len(ds) == 4
    first = ds[0]
    assert first["text"] == "a red square" and first["image_id"] == "x1" and first["image"].shape == (3, 24, 24)
    skipped_to = ds[1]  # missing, then corrupt: both skipped, the next readable entry answers
    assert skipped_to["text"] == "blue very blue" and skipped_to["image_id"] == 3
    assert ds.skipped == 2
    assert ds[2]["image_id"] == 3 and ds.skipped == 2  # an unreadable entry is remembered, counted once
    assert torch.equal(ds[3]["image"], skipped_to["image"])


def test_caption_json_caption_list_is_seeded_by_epoch(tmp_path):
    _save(tmp_path / "a.png")
    (tmp_path / "ann.json").write_text(json.dumps([{"image": "a.png", "caption": ["First one.", "Second one!"]}]))
    ds = CaptionJsonDataset(tmp_path / "ann.json", tmp_path, prompt="a photo of ")
    picks = []
    for epoch in range(20):
        ds.set_epoch(epoch)
        picks.append(ds[0]["text"])
        assert ds[0]["text"] == picks[-1]  # deterministic within an epoch
    assert set(picks) == {"a photo of first one", "a photo of second one"}
    again = CaptionJsonDataset(tmp_path / "ann.json", tmp_path, prompt="a photo of ")
    again.set_epoch(7)
    assert again[0]["text"] == picks[7]


def test_caption_json_coco_layout(tmp_path):
    _save(tmp_path / "val2014" / "COCO_1.png")
    _save(tmp_path / "val2014" / "COCO_2.png", (0, 255, 0))
    coco = {
        "images": [{"id": 1, "file_name": "val2014/COCO_1.png"}, {"id": 2, "file_name": "val2014/COCO_2.png"}],
        "annotations": [
            {"id": 10, "image_id": 2, "caption": "A green field."},
            {"id": 11, "image_id": 1, "caption": "A red wall"},
            {"id": 12, "image_id": 2, "caption": "Grass: lots of it"},
        ],
    }
    (tmp_path / "captions.json").write_text(json.dumps(coco))
    ds = CaptionJsonDataset(tmp_path / "captions.json", tmp_path)
    items = [ds[i] for i in range(len(ds))]
    assert [(it["image_id"], it["text"]) for it in items] == [
        (2, "a green field"), (1, "a red wall"), (2, "grass lots of it")
    ]
    assert items[0]["image"].getpixel((0, 0)) == (0, 255, 0)


def test_caption_json_missing_or_bad_annotation_file(tmp_path):
    with pytest.raises(Blip2Error) as e:
        CaptionJsonDataset(tmp_path / "nope.json", tmp_path)
    assert "nope.json" in str(e.value) and "\n" not in str(e.value)
    (tmp_path / "bad.json").write_text('{"images": []}')
    with pytest.raises(Blip2Error, match="bad.json"):
        CaptionJsonDataset(tmp_path / "bad.json", tmp_path)


# --- webdataset shards -----------------------------------------------------------------------------


def _jpeg(colour) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (24, 20), colour).save(buf, format="JPEG")
    return buf.getvalue()


def _write_shards(root, n_shards=4, per_shard=3, extra=None):
    """img2dataset-like shards; sample key SSSSSIIII; caption 'Shard S, item I.'"""
    urls = []
    for s in range(n_shards):
        url = str(root / f"{s:05d}.tar")
        with wds.TarWriter(url) as sink:
            for i in range(per_shard):
                key = f"{s:05d}{i:04d}"
                sink.write({"__key__": key, "jpg": _jpeg((s * 40, i * 60, 90)), "txt": f"Shard {s}, item {i}.",
                            "json": {"key": key, "caption": f"Shard {s}, item {i}.", "status": "success"}})
            for sample in (extra or {}).get(s, []):
                sink.write(sample)
        urls.append(url)
    return urls


def _keys(dataset) -> list[str]:
    return [s["key"] for s in dataset]


def test_webdataset_reads_all_samples_with_clean_captions(tmp_path):
    urls = _write_shards(tmp_path)
    ds = webdataset_samples(urls, image_transform(16), seed=3)
    samples = list(ds)
    assert len(samples) == 12 and ds.stats == {"seen": 12, "skipped": 0, "errors": 0}
    by_key = {s["key"]: s for s in samples}
    assert set(by_key) == {f"{s:05d}{i:04d}" for s in range(4) for i in range(3)}
    assert by_key["000020001"]["text"] == "shard 2, item 1"
    assert by_key["000020001"]["image"].shape == (3, 16, 16)
    # deterministic given (seed, epoch); another epoch reorders
    assert _keys(webdataset_samples(urls, None, seed=3)) == [s["key"] for s in samples]
    other = webdataset_samples(urls, None, seed=3)
    other.set_epoch(1)
    assert sorted(_keys(other)) == sorted(by_key) and _keys(other) != [s["key"] for s in samples]
    # a brace pattern names the same shards
    assert sorted(_keys(webdataset_samples(str(tmp_path / "{00000..00003}.tar"), None))) == sorted(by_key)


def test_webdataset_capfilt_captions_sampled_per_visit(tmp_path):
    capfilt = {"__key__": "capfilt", "jpg": _jpeg((1, 2, 3)), "txt": "the original web text",
               "json": {"captions": [{"text": "A small dog.", "score": 0.9}, {"text": "A puppy!", "score": 0.7}]}}
    urls = _write_shards(tmp_path, n_shards=1, per_shard=1, extra={0: [capfilt]})
    ds = webdataset_samples(urls, None, seed=0, shuffle=0)
    picks = []
    for epoch in range(30):
        ds.set_epoch(epoch)
        texts = {s["key"]: s["text"] for s in ds}
        picks.append(texts["capfilt"])
        assert texts["000000000"] == "shard 0, item 0"  # no captions list: the txt member
    assert set(picks) == {"a small dog", "a puppy"}


def test_webdataset_ranks_get_disjoint_shards_covering_all(tmp_path):
    urls = _write_shards(tmp_path, n_shards=5, per_shard=2)
    seen = []
    for rank in range(2):
        keys = _keys(webdataset_samples(urls, None, rank=rank, world_size=2))
        assert {int(k[:5]) % 2 for k in keys} == {rank}  # shard i goes to rank i % 2
        seen.append(set(keys))
    assert not seen[0] & seen[1]
    assert seen[0] | seen[1] == {f"{s:05d}{i:04d}" for s in range(5) for i in range(2)}
    with pytest.raises(Blip2Error, match="rank"):
        webdataset_samples(urls[:1], None, rank=1, world_size=2)


def test_webdataset_splits_shards_across_loader_workers(tmp_path):
    urls = _write_shards(tmp_path, n_shards=4, per_shard=3)
    ds = webdataset_samples(urls, image_transform(16), seed=1)
    loader = DataLoader(ds, batch_size=3, num_workers=2, collate_fn=collate)
    keys = [k for batch in loader for k in batch["key"]]
    assert sorted(keys) == sorted(_keys(webdataset_samples(urls, None)))  # each sample once


def test_webdataset_skips_and_counts_corrupt_samples(tmp_path):
    bad = [
        {"__key__": "badimage", "jpg": b"\xff\xd8 truncated jpeg", "txt": "a caption"},
        {"__key__": "nocaption", "jpg": _jpeg((9, 9, 9)), "json": {"status": "success"}},
        {"__key__": "noimage", "txt": "a caption without a picture"},
    ]
    urls = _write_shards(tmp_path, n_shards=2, per_shard=2, extra={1: bad})
    ds = webdataset_samples(urls, image_transform(16))
    keys = _keys(ds)
    assert sorted(keys) == ["000000000", "000000001", "000010000", "000010001"]
    assert ds.stats["seen"] == 7 and ds.stats["skipped"] == 3
    with pytest.raises(Blip2Error, match="missing.tar"):
        webdataset_samples([str(tmp_path / "missing.tar")], None)


def test_webdataset_survives_unreadable_shards(tmp_path):
    good = _write_shards(tmp_path, n_shards=1, per_shard=4)[0]
    data = open(good, "rb").read()
    (tmp_path / "truncated.tar").write_bytes(data[: len(data) // 2])
    (tmp_path / "garbage.tar").write_bytes(b"not a tar file" * 100)
    urls = [str(tmp_path / "truncated.tar"), str(tmp_path / "garbage.tar"), good]
    ds = webdataset_samples(urls, None, shuffle=0)
    keys = _keys(ds)
    assert set(keys) >= {f"00000{i:04d}" for i in range(4)}  # the good shard is read in full
    assert ds.stats["errors"] >= 2


# --- mixture -------------------------------------------------------------------------------------


class Counting(IterableDataset):
    """An iterable source of ``n`` items per epoch, tagged with the epoch, order seeded by it."""

    def __init__(self, tag: str, n: int):
        self.tag, self.n, self.epoch = tag, n, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        order = list(range(self.n))
        random.Random(self.epoch).shuffle(order)
        return iter(f"{self.tag}{self.epoch}:{i}" for i in order)


def _sources():
    return [[f"a{i}" for i in range(7)], Counting("b", 5), [f"c{i}" for i in range(3)]]


def test_mixture_frequencies_follow_weights():
    draws = list(islice(Mixture(_sources(), weights=[6, 3, 1], seed=4), 4000))
    freq = Counter(d[0] for d in draws)
    for tag, weight in zip("abc", (0.6, 0.3, 0.1)):
        assert abs(freq[tag] / 4000 - weight) < 0.03
    assert set(Counter(d[0] for d in islice(Mixture(_sources(), [1, 0, 1]), 500))) == {"a", "c"}


def test_mixture_restarts_sources_by_epoch():
    draws = list(islice(Mixture([[0, 1, 2]]), 9))
    assert [sorted(draws[i : i + 3]) for i in (0, 3, 6)] == [[0, 1, 2]] * 3  # a permutation per epoch
    assert draws[:3] != draws[3:6] or draws[3:6] != draws[6:9]
    iterable = list(islice(Mixture([Counting("b", 4)]), 12))
    assert [d.split(":")[0] for d in iterable] == ["b0"] * 4 + ["b1"] * 4 + ["b2"] * 4


def test_mixture_resumes_exactly():
    reference = list(islice(Mixture(_sources(), weights=[2, 1, 1], seed=9), 120))
    first = Mixture(_sources(), weights=[2, 1, 1], seed=9)
    assert list(islice(first, 37)) == reference[:37]
    state = json.loads(json.dumps(first.state_dict()))
    assert state["position"] == 37
    resumed = Mixture(_sources(), weights=[2, 1, 1], seed=9)
    resumed.load_state_dict(state)
    assert list(islice(resumed, 50)) == reference[37:87]
    assert resumed.state_dict()["position"] == 87
    with pytest.raises(Blip2Error, match="seed"):
        Mixture(_sources(), weights=[2, 1, 1], seed=10).load_state_dict(state)
    with pytest.raises(Blip2Error, match="weights"):
        Mixture(_sources(), weights=[1, 1, 1], seed=9).load_state_dict(state)


def test_mixture_in_loader_workers_matches_the_single_process_stream():
    sources = [[{"text": f"a{i}"} for i in range(7)], [{"text": f"c{i}"} for i in range(3)]]
    reference = [s["text"] for s in islice(Mixture(sources, [3, 1], seed=2), 40)]
    mixture = Mixture(sources, [3, 1], seed=2, block_size=4)
    mixture.load_state_dict({"position": 8})
    loader = DataLoader(mixture, batch_size=4, num_workers=2, collate_fn=collate)
    texts = [t for batch in islice(loader, 6) for t in batch["text"]]
    assert texts == reference[8:32]


# --- collation -------------------------------------------------------------------------------------


def test_collate_stacks_images_and_lists_the_rest():
    samples = [{"image": torch.full((3, 4, 4), float(i)), "text": f"t{i}", "image_id": i, "colour": "red"}
               for i in range(3)]
    samples[2].pop("colour")
    batch = collate(samples)
    assert batch["image"].shape == (3, 3, 4, 4) and batch["image"][2, 0, 0, 0] == 2
    assert batch["text"] == ["t0", "t1", "t2"] and batch["image_id"] == [0, 1, 2]
    assert "colour" not in batch
