"""Annotation files: fetch from a loopback mirror, keep, copy from --from, extract zip members, fail in one line."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import sys
import threading
import zipfile
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import typer

from blip2cli.data import annotations as ann
from blip2cli.runtime import download
from blip2cli.runtime.errors import Blip2Error

from tests.helpers import free_port, invoke

COCO_TEST = "sfr-vision-language-research/datasets/coco_karpathy_test.json"
COCO_TEST_GT = "sfr-vision-language-research/datasets/coco_karpathy_test_gt.json"
GQA_TESTDEV = "sfr-vision-language-research/LAVIS/datasets/gqa/testdev_balanced_questions.json"
VQA_ZIP = "cvmlp/vqa/mscoco/vqa/v2_Questions_Test_mscoco.zip"
VQA_MEMBER = "v2_OpenEnded_mscoco_test-dev2015_questions.json"


class Mirror:
    """A loopback HTTP server over a directory laid out like the real URL paths; it records each request path."""

    def __init__(self, root: Path) -> None:
        self.root, self.requests, self.truncated = root, [], set()
        mirror = self

        class Handler(SimpleHTTPRequestHandler):
            def do_GET(self) -> None:
                mirror.requests.append(self.path)
                if self.path.lstrip("/") in mirror.truncated:  # promise more bytes than are sent, then hang up
                    body = (mirror.root / self.path.lstrip("/")).read_bytes()
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(body) + 1000))
                    self.end_headers()
                    self.wfile.write(body)
                    self.close_connection = True
                    return
                super().do_GET()

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), partial(Handler, directory=str(root)))
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def put(self, path: str, data: bytes) -> bytes:
        target = self.root / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        return data


@pytest.fixture
def mirror(tmp_path, monkeypatch):
    m = Mirror(tmp_path / "served")
    m.thread.start()
    monkeypatch.setenv(download.MIRROR_ENV, m.url)
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "BLIP2_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    yield m
    m.server.shutdown()
    m.server.server_close()


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def register_md5(monkeypatch, dataset: str, name: str, value: str | None) -> None:
    files = tuple(dataclasses.replace(f, md5=value) if f.name == name else f for f in ann.ANNOTATIONS[dataset])
    monkeypatch.setitem(ann.ANNOTATIONS, dataset, files)


def listing(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir()) if directory.exists() else []


def serve_coco_test(mirror: Mirror, monkeypatch) -> tuple[bytes, bytes]:
    items = mirror.put(COCO_TEST, json.dumps([{"image": "val2014/a.jpg", "caption": ["a cat"]}]).encode())
    refs = mirror.put(COCO_TEST_GT, json.dumps({"images": [], "annotations": []}).encode())
    register_md5(monkeypatch, "coco", "coco_karpathy_test.json", md5(items))
    return items, refs


def test_fetch_writes_files_and_manifest_then_keeps_them(mirror, monkeypatch, tmp_path):
    items, refs = serve_coco_test(mirror, monkeypatch)
    out = tmp_path / "out"
    prepared = ann.prepare_annotations("coco", out, splits=["test"])
    assert [(p.name, p.action) for p in prepared] == [("coco_karpathy_test.json", "fetched"),
                                                      ("coco_karpathy_test_gt.json", "fetched")]
    assert (out / "coco_karpathy_test.json").read_bytes() == items
    assert (out / "coco_karpathy_test_gt.json").read_bytes() == refs
    assert listing(out) == ["MANIFEST.json", "coco_karpathy_test.json", "coco_karpathy_test_gt.json"]
    manifest = {f["name"]: f for f in json.loads((out / "MANIFEST.json").read_text())["files"]}
    assert manifest["coco_karpathy_test.json"]["md5"] == md5(items)
    assert manifest["coco_karpathy_test_gt.json"]["md5"] == md5(refs)
    assert manifest["coco_karpathy_test_gt.json"]["size"] == len(refs)
    assert manifest["coco_karpathy_test_gt.json"]["role"] == "references"
    assert manifest["coco_karpathy_test.json"]["url"] == f"{mirror.url}/{COCO_TEST}"
    assert len(mirror.requests) == 2

    again = ann.prepare_annotations("coco", out, splits=["test"])
    assert [p.action for p in again] == ["kept", "kept"]
    assert len(mirror.requests) == 2


def test_changed_file_is_reported_against_the_manifest(mirror, monkeypatch, tmp_path, capsys):
    serve_coco_test(mirror, monkeypatch)
    out = tmp_path / "out"
    ann.prepare_annotations("coco", out, splits=["test"])
    (out / "coco_karpathy_test_gt.json").write_text("{}")
    ann.prepare_annotations("coco", out, splits=["test"])
    assert "coco_karpathy_test_gt.json changed since it was prepared" in capsys.readouterr().err


def test_download_with_wrong_md5_fails_and_leaves_nothing(mirror, monkeypatch, tmp_path):
    serve_coco_test(mirror, monkeypatch)
    register_md5(monkeypatch, "coco", "coco_karpathy_test.json", "0" * 32)
    out = tmp_path / "out"
    with pytest.raises(Blip2Error, match="coco_karpathy_test.json") as e:
        ann.prepare_annotations("coco", out, splits=["test"])
    assert "0" * 32 in str(e.value) and "\n" not in str(e.value)
    assert listing(out) == []


def test_corrupt_kept_file_is_an_error(mirror, monkeypatch, tmp_path):
    serve_coco_test(mirror, monkeypatch)
    out = tmp_path / "out"
    out.mkdir()
    (out / "coco_karpathy_test.json").write_text("[]")
    with pytest.raises(Blip2Error, match=r"coco_karpathy_test.json is corrupt; delete it") as e:
        ann.prepare_annotations("coco", out, splits=["test"])
    assert "\n" not in str(e.value)
    assert mirror.requests == []


def closed_port_url() -> str:
    return f"http://127.0.0.1:{free_port()}"


@pytest.mark.parametrize("failure", ["404", "refused", "truncated", "offline"])
def test_unobtainable_file_is_one_line_naming_url_and_directory(mirror, monkeypatch, tmp_path, failure):
    base = mirror.url
    if failure == "refused":
        base = closed_port_url()
        monkeypatch.setenv(download.MIRROR_ENV, base)
    elif failure == "truncated":
        mirror.put(GQA_TESTDEV, b"[]" * 500)
        mirror.truncated.add(GQA_TESTDEV)
    elif failure == "offline":
        mirror.put(GQA_TESTDEV, b"[]")
        monkeypatch.setenv("BLIP2_OFFLINE", "1")
    out = tmp_path / "out"
    with pytest.raises(Blip2Error) as e:
        ann.prepare_annotations("gqa", out, splits=["test-dev"])
    message = str(e.value)
    assert "\n" not in message
    assert f"{base}/{GQA_TESTDEV}" in message and str(out) in message and "--from DIR" in message
    assert {"404": "HTTP 404", "refused": "cannot reach", "truncated": "incomplete", "offline": "offline"}[failure] \
        in message
    assert not out.exists()  # no empty directory left behind
    if failure == "offline":
        assert mirror.requests == []


def test_from_dir_finds_a_nested_hand_downloaded_file(mirror, monkeypatch, tmp_path):
    monkeypatch.setenv(download.MIRROR_ENV, closed_port_url())
    data = json.dumps([{"question": "q?"}]).encode()
    nested = tmp_path / "downloads" / "gqa" / "questions1.2"
    nested.mkdir(parents=True)
    (nested / "testdev_balanced_questions.json").write_bytes(data)
    out = tmp_path / "out"
    [prepared] = ann.prepare_annotations("gqa", out, splits=["test-dev"], source_dir=tmp_path / "downloads")
    assert prepared.action == "copied" and prepared.md5 == md5(data)
    assert (out / "testdev_balanced_questions.json").read_bytes() == data
    assert mirror.requests == []


def test_from_dir_with_wrong_md5_copies_nothing(tmp_path, monkeypatch):
    register_md5(monkeypatch, "gqa", "testdev_balanced_questions.json", "0" * 32)
    (tmp_path / "downloads").mkdir()
    (tmp_path / "downloads" / "testdev_balanced_questions.json").write_text("[]")
    with pytest.raises(Blip2Error, match="corrupt or another version"):
        ann.prepare_annotations("gqa", tmp_path / "out", splits=["test-dev"], source_dir=tmp_path / "downloads")
    assert listing(tmp_path / "out") == []


def make_zip(member_data: bytes) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        zf.writestr(VQA_MEMBER, member_data)
        zf.writestr("v2_OpenEnded_mscoco_test2015_questions.json", b"{}")
    return buffer.getvalue()


def test_zip_member_is_extracted_and_the_archive_dropped(mirror, tmp_path):
    questions = json.dumps({"questions": [{"question_id": 1, "image_id": 2, "question": "what?"}]}).encode()
    mirror.put(VQA_ZIP, make_zip(questions))
    out = tmp_path / "out"
    [prepared] = ann.prepare_annotations("vqav2", out, splits=["test-dev"])
    assert prepared.name == VQA_MEMBER and prepared.action == "fetched"
    assert (out / VQA_MEMBER).read_bytes() == questions
    assert listing(out) == ["MANIFEST.json", VQA_MEMBER]
    assert mirror.requests == [f"/{VQA_ZIP}"]


def test_zip_archive_in_from_dir_is_extracted(tmp_path, monkeypatch):
    monkeypatch.setenv("BLIP2_OFFLINE", "1")
    (tmp_path / "downloads" / "vqa").mkdir(parents=True)
    (tmp_path / "downloads" / "vqa" / Path(VQA_ZIP).name).write_bytes(make_zip(b'{"questions": []}'))
    [prepared] = ann.prepare_annotations("vqav2", tmp_path / "out", splits=["test-dev"],
                                         source_dir=tmp_path / "downloads")
    assert prepared.action == "copied"
    assert (tmp_path / "out" / VQA_MEMBER).read_bytes() == b'{"questions": []}'


def test_splits_and_datasets_are_checked():
    assert {f.name for f in ann.annotation_files("nocaps", ["val"])} == {"nocaps_val.json",
                                                                         "nocaps_val_4500_captions.json"}
    with pytest.raises(Blip2Error, match="known: coco, vqav2"):
        ann.annotation_files("imagenet")
    with pytest.raises(Blip2Error, match="choose from"):
        ann.annotation_files("gqa", ["validation"])


def test_eval_hints_use_real_eval_options():
    from blip2cli.cli import eval as eval_cmd

    commands = typer.main.get_command(eval_cmd.app).commands
    out = Path("/data/x")
    assert ann.eval_hint("vqav2", out)[0] == ("blip2 eval vqav2 --questions /data/x/v2_OpenEnded_mscoco_val2014_"
                                              "questions.json --annotations /data/x/v2_mscoco_val2014_annotations.json")
    for dataset, hints in ann.EVAL_HINTS.items():
        names = {f.name for f in ann.annotation_files(dataset)}
        for command, options in hints:
            known = {opt for param in commands[command].params for opt in param.opts}
            for option, name in options:
                assert option in known, (command, option)
                assert name in names, (dataset, name)


def test_cli_json_is_one_object_on_stdout(mirror, tmp_path):
    data = mirror.put(GQA_TESTDEV, b'[{"question_id": "1"}]')
    out = tmp_path / "out"
    result = invoke("prepare", "gqa", "--out", out, "--split", "test-dev", "--json")
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    assert [(f["name"], f["md5"], f["size"], f["action"]) for f in record["files"]] == [
        ("testdev_balanced_questions.json", md5(data), len(data), "fetched")]
    assert record["eval"] == [f"blip2 eval gqa --questions {out / 'testdev_balanced_questions.json'}"]


def test_cli_failure_is_one_error_line(mirror, tmp_path, monkeypatch, capsys):
    from blip2cli.cli import app as app_module

    args = ["prepare", "flickr30k", "--out", str(tmp_path / "out"), "--split", "test", "--json"]
    result = invoke(*args)
    assert result.exit_code != 0 and isinstance(result.exception, Blip2Error)

    monkeypatch.setattr(sys, "argv", ["blip2", *args])
    with pytest.raises(SystemExit) as e:
        app_module.main()
    assert e.value.code != 0
    captured = capsys.readouterr()
    assert captured.out == ""
    [line] = captured.err.strip().splitlines()
    assert line.startswith("error: cannot get flickr30k_test.json: HTTP 404")
