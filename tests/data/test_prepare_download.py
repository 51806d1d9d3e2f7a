"""``blip2 prepare`` downloads: img2dataset against a loopback ``http.server``, subsets, resume, bad input."""

from __future__ import annotations

import io
import json
import socket
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from blip2cli.data.download import DownloadRecipe, parse_count, prepare_download, write_url_list
from blip2cli.runtime.errors import Blip2Error

from tests.helpers import blip2, free_port, invoke

GOOD = 7  # images the server really has


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """``python -m http.server`` on 127.0.0.1 over a directory of PIL-drawn images and bad payloads."""
    root = tmp_path_factory.mktemp("www")
    for i in range(GOOD):
        Image.new("RGB", (90 + 30 * i, 70 + 10 * i), (30 * i, 120, 200)).save(root / f"img{i}.jpg", quality=95)
    (root / "not-an-image.jpg").write_text("<html>this is not an image</html>")
    whole = io.BytesIO()
    Image.new("RGB", (300, 200), (1, 2, 3)).save(whole, "JPEG")
    (root / "truncated.jpg").write_bytes(whole.getvalue()[:200])
    Image.new("RGB", (400, 400), (9, 9, 9)).save(root / "huge.jpg")
    port = free_port()
    log = root.parent / "server.log"
    with open(log, "w") as log_file:
        proc = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1",
                                 "--directory", str(root)], stdout=log_file, stderr=subprocess.STDOUT)
    deadline = time.time() + 20
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.1)
    yield f"http://127.0.0.1:{port}", log
    proc.terminate()
    proc.wait(timeout=10)


def _requests(log: Path) -> int:
    return sum('"GET ' in line for line in log.read_text().splitlines())


def _samples(tar_path: Path) -> dict[str, dict[str, bytes]]:
    out: dict[str, dict[str, bytes]] = {}
    with tarfile.open(tar_path) as tar:
        for m in tar.getmembers():
            stem, _, ext = m.name.partition(".")
            out.setdefault(stem, {})[ext] = tar.extractfile(m).read()
    return out


@pytest.mark.slow
def test_cc3m_download_to_shards_counts_failures_and_resumes(server, tmp_path):
    base, log = server
    rows = [(f"caption number {i}", f"{base}/img{i}.jpg") for i in range(GOOD)]
    rows += [("dead link", f"{base}/missing.jpg"), ("refused", f"http://127.0.0.1:{free_port()}/x.jpg"),
             ("html", f"{base}/not-an-image.jpg"), ("cut short", f"{base}/truncated.jpg"),
             ("too big", f"{base}/huge.jpg")]
    tsv = tmp_path / "Train_GCC-training.tsv"  # cc3m's layout: no header, caption then URL
    tsv.write_text("".join(f"{c}\t{u}\n" for c, u in rows))
    out = tmp_path / "cc3m"
    args = ["prepare", "cc3m", "--input", str(tsv), "--out", str(out), "--processes", "1", "--threads", "4",
            "--set", "samples_per_shard=5", "--set", "image_size=64", "--set", "max_image_area=100000", "--json"]
    env = {"NO_ALBUMENTATIONS_UPDATE": "1"}
    proc = blip2(*args, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads(proc.stdout)  # stdout holds the summary and nothing else
    assert (summary["rows"], summary["count"], summary["shards"]) == (12, 12, 3)
    assert summary["successes"] == GOOD
    assert summary["failed_to_download"] == 2  # 404 and connection refused
    assert summary["failed_to_resize"] == 3  # not an image, truncated, over max_image_area
    reasons = " | ".join(f["reason"] for f in summary["top_failures"])
    assert "404" in reasons and "too large" in reasons and "decoding" in reasons.lower()

    tars = sorted(out.glob("*.tar"))
    assert [t.name for t in tars] == ["00000.tar", "00001.tar", "00002.tar"]
    written = {}
    for t in tars:
        written.update(_samples(t))
    assert len(written) == GOOD
    captions = {}
    for sample in written.values():
        assert set(sample) == {"jpg", "txt", "json"}
        meta = json.loads(sample["json"])
        assert meta["caption"] == sample["txt"].decode()
        captions[meta["url"]] = sample["txt"].decode()
        with Image.open(io.BytesIO(sample["jpg"])) as im:
            assert min(im.size) == 64  # keep_ratio: the shorter side at image_size
    assert captions == {u: c for c, u in rows[:GOOD]}

    # a second run skips every finished shard: no request reaches the server, no shard is rewritten
    before = _requests(log)
    mtimes = {t: t.stat().st_mtime_ns for t in tars}
    again = blip2(*args, env=env, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert json.loads(again.stdout)["successes"] == GOOD
    assert _requests(log) == before
    assert {t: t.stat().st_mtime_ns for t in tars} == mtimes


def test_finished_shards_survive_and_missing_ones_are_redone(server, tmp_path):
    base, log = server
    tsv = tmp_path / "list.tsv"
    tsv.write_text("".join(f"c{i}\t{base}/img{i}.jpg\n" for i in range(GOOD)))
    recipe = DownloadRecipe(input_format="tsv", header=False, columns=["caption", "url"], image_size=32,
                            samples_per_shard=4, processes=1, threads=2)
    out = tmp_path / "out"
    prepare_download([str(tsv)], out, recipe)
    kept = out / "00000.tar"
    kept_bytes = kept.read_bytes()
    (out / "00001_stats.json").unlink()  # as if the run died while writing shard 1
    (out / "00001.tar").write_bytes(b"partial")
    before = _requests(log)
    summary = prepare_download([str(tsv)], out, recipe)
    assert _requests(log) - before == GOOD - 4  # only shard 1's rows were fetched again
    assert kept.read_bytes() == kept_bytes
    assert len(_samples(out / "00001.tar")) == GOOD - 4
    assert summary["successes"] == GOOD


def _laion_parquet(path: Path, n: int, offset: int = 0) -> None:
    pq.write_table(pa.table({"SAMPLE_ID": list(range(offset, offset + n)),
                             "URL": [f"http://127.0.0.1:1/{i}.jpg" for i in range(offset, offset + n)],
                             "TEXT": [f"text {i}" for i in range(offset, offset + n)],
                             "similarity": [0.3] * n, "NSFW": ["UNLIKELY"] * n, "LICENSE": ["?"] * n}), path)


def test_subset_is_exact_reproducible_and_seeded(tmp_path):
    meta = tmp_path / "laion"
    meta.mkdir()
    _laion_parquet(meta / "part-00000.parquet", 300)
    _laion_parquet(meta / "part-00001.parquet", 200, offset=300)
    recipe = DownloadRecipe(input_format="parquet", url_col="URL", caption_col="TEXT",
                            extra_columns=["SAMPLE_ID", "similarity"])
    files = sorted(meta.glob("*.parquet"))

    def draw(work: Path, seed: int) -> list[int]:
        assert write_url_list(files, recipe, work, 120, seed) == 120
        table = pa.concat_tables([pq.read_table(p) for p in sorted((work / "_prepare" / "input").glob("*.parquet"))])
        assert table.column_names == ["url", "caption", "SAMPLE_ID", "similarity"]
        ids = table.column("SAMPLE_ID").to_pylist()
        assert table.column("caption").to_pylist() == [f"text {i}" for i in ids]
        return ids

    first = draw(tmp_path / "a", seed=7)
    assert len(set(first)) == 120 and set(first) <= set(range(500))
    assert 0 < sum(i >= 300 for i in first) < 120  # both files contribute
    assert draw(tmp_path / "b", seed=7) == first
    assert draw(tmp_path / "c", seed=8) != first
    with pytest.raises(Blip2Error, match="another --subset/--seed"):
        write_url_list(files, recipe, tmp_path / "a", 120, 8)
    with pytest.raises(Blip2Error, match="only 500 rows"):
        write_url_list(files, recipe, tmp_path / "d", 501, 0)


def test_parse_count():
    assert [parse_count(s) for s in ("115m", "10k", "2.5M", "1000")] == [115_000_000, 10_000, 2_500_000, 1000]
    with pytest.raises(Blip2Error):
        parse_count("lots")


def test_bad_metadata_is_a_one_line_error(tmp_path):
    bad = tmp_path / "meta.parquet"
    _laion_parquet(bad, 3)
    recipe = DownloadRecipe(input_format="parquet", url_col="url", caption_col="caption")
    with pytest.raises(Blip2Error, match="no column 'url'"):
        prepare_download([str(bad)], tmp_path / "out", recipe)
    csv = tmp_path / "meta.csv"
    csv.write_text("link,text\nhttp://127.0.0.1:1/a.jpg,a\n")
    with pytest.raises(Blip2Error, match="no column 'url'"):
        prepare_download([str(csv)], tmp_path / "out-csv", DownloadRecipe(input_format="csv"))
    proc = blip2("prepare", "laion", "--input", tmp_path / "nothing-here", "--out", tmp_path / "o", timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"error: --input {tmp_path / 'nothing-here'}: no parquet file there"]


def test_caption_list_with_local_images_groups_captions_per_image(tmp_path):
    """COCO/VG style: a LAVIS list (one entry per caption) and local images (file URLs) -> one sample per
    image, all its captions in the json, and the pretraining loader draws among them."""
    from blip2cli.data import webdataset_samples

    images = tmp_path / "images" / "train2014"
    images.mkdir(parents=True)
    entries = []
    for i in range(3):
        Image.new("RGB", (50, 40), (80 * i, 10, 10)).save(images / f"COCO_train2014_{i:012d}.jpg")
        entries += [{"image": f"train2014/COCO_train2014_{i:012d}.jpg", "caption": f"image {i} caption {j}",
                     "image_id": f"coco_{i}"} for j in range(3)]
    ann = tmp_path / "coco_karpathy_train.json"
    ann.write_text(json.dumps(entries))
    recipe = DownloadRecipe(input_format="json", images=str(tmp_path / "images"), image_size=32, processes=1,
                            threads=2)
    summary = prepare_download([str(ann)], tmp_path / "shards", recipe)
    assert (summary["rows"], summary["successes"]) == (3, 3)
    written = _samples(tmp_path / "shards" / "00000.tar")
    by_image = {json.loads(s["json"])["image"]: json.loads(s["json"]) for s in written.values()}
    assert set(by_image) == {e["image"] for e in entries}
    for image, meta in by_image.items():
        i = int(image[-8:-4])
        assert [c["text"] for c in meta["captions"]] == [f"image {i} caption {j}" for j in range(3)]

    seen: dict[str, set[str]] = {}
    data = webdataset_samples(str(tmp_path / "shards"), transform=None, shuffle=0)
    for epoch in range(12):
        data.set_epoch(epoch)
        for sample in data:
            seen.setdefault(sample["key"], set()).add(sample["text"])
    assert len(seen) == 3
    for texts in seen.values():
        i = int(next(iter(texts)).split()[1])
        assert texts == {f"image {i} caption {j}" for j in range(3)}


def test_every_prepare_recipe_loads():
    from blip2cli.config import load_recipe, recipes_root
    from blip2cli.data.capfilt import CapFiltRecipe

    sources = sorted(p.stem for p in recipes_root().glob("prepare/*.yaml") if p.stem != "capfilt")
    assert sources == ["cc12m", "cc3m", "coco", "laion", "sbu", "vg"]
    for source in sources:
        recipe = load_recipe(DownloadRecipe, f"prepare/{source}")
        recipe.check()
        assert recipe.image_size >= 224 and recipe.resize_mode == "keep_ratio"
    assert load_recipe(DownloadRecipe, "prepare/laion").url_col == "URL"
    capfilt = load_recipe(CapFiltRecipe, "prepare/capfilt")
    assert (capfilt.num_captions, capfilt.top_p, capfilt.keep, capfilt.prompt) == (10, 0.9, 2, "a picture of ")
    with pytest.raises(Blip2Error, match="did you mean 'top_p'"):
        load_recipe(CapFiltRecipe, "prepare/capfilt", ["topp=0.5"])


def test_prepare_coco_shards_from_hand_downloaded_annotations(tmp_path, monkeypatch):
    """`blip2 prepare coco --shards`: the Karpathy train list found with --from, its images as shards."""
    import dataclasses

    from blip2cli.data import annotations

    # the stand-in list is not the published file, so its registered md5 cannot match
    monkeypatch.setitem(annotations.ANNOTATIONS, "coco",
                        tuple(dataclasses.replace(f, md5=None) for f in annotations.ANNOTATIONS["coco"]))
    monkeypatch.setenv("BLIP2_OFFLINE", "1")
    images = tmp_path / "coco-images"
    (images / "train2014").mkdir(parents=True)
    entries = []
    for i in range(2):
        Image.new("RGB", (60, 48), (10, 90 * i, 10)).save(images / "train2014" / f"COCO_train2014_{i:012d}.jpg")
        entries += [{"image": f"train2014/COCO_train2014_{i:012d}.jpg", "caption": f"caption {i}.{j}",
                     "image_id": f"coco_{i}"} for j in range(2)]
    downloads = tmp_path / "downloads" / "nested"
    downloads.mkdir(parents=True)
    (downloads / "coco_karpathy_train.json").write_text(json.dumps(entries))
    out = tmp_path / "coco"
    result = invoke("prepare", "coco", "--shards", "--split", "train", "--from", tmp_path / "downloads", "--images",
                    images, "--out", out, "--processes", "1", "--threads", "2", "--set", "image_size=32", "--json")
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout.strip().splitlines()[-1])
    assert [(f["name"], f["action"]) for f in record["files"]] == [("coco_karpathy_train.json", "copied")]
    assert record["shards"]["successes"] == 2
    written = _samples(out / "shards" / "00000.tar")
    assert sorted(json.loads(s["json"])["image"] for s in written.values()) == sorted({e["image"] for e in entries})
