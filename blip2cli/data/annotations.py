"""Annotation files for fine-tuning and evaluation: where each one is published, and fetching or locating them.

Every file is looked for in the output directory first, then (recursively, by name) in a directory of
hand-downloaded files, and only then downloaded. Downloads are atomic: a partial file never carries
the final name. ``MANIFEST.json`` in the output directory records what was prepared.

Environment:

- ``BLIP2_MIRROR`` (or ``BLIP2_ANNOTATIONS_MIRROR``): a URL prefix that replaces the scheme and host of every
  URL (``blip2cli.runtime.download``).
- ``BLIP2_OFFLINE=1``, ``HF_HUB_OFFLINE=1`` or ``TRANSFORMERS_OFFLINE=1``: never download; files must already
  be in place or under ``--from``.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
import tempfile
import zipfile
from collections.abc import Callable, Collection
from dataclasses import asdict, dataclass
from pathlib import Path

from ..runtime.errors import Blip2Error
from ..runtime.download import DownloadFailed, copy_hashing, effective_url, file_md5, offline, stream, url_name
from ..runtime.io import atomic_open

MANIFEST = "MANIFEST.json"

_LAVIS = "https://storage.googleapis.com/sfr-vision-language-research/LAVIS/datasets"
_SFR = "https://storage.googleapis.com/sfr-vision-language-research/datasets"


@dataclass(frozen=True)
class AnnotationFile:
    """One published annotation file.

    ``split`` is the data split it belongs to (train, val, test, test-dev); ``role`` what it is:
    ``annotations`` (a LAVIS list of samples), ``references`` (COCO-format captions for scoring),
    ``eval-questions`` / ``eval-annotations`` (the official VQA-style files) or ``answer-list``.
    ``md5`` is that of the final local file (the extracted member when ``member`` is set).
    """

    name: str
    url: str
    md5: str | None
    split: str
    role: str
    member: str | None = None

    def tags(self) -> set[str]:
        return {self.split, self.role}


@dataclass(frozen=True)
class PreparedFile:
    """A file in place in the output directory; ``action`` is kept, copied or fetched."""

    name: str
    path: Path
    url: str
    md5: str
    size: int
    split: str
    role: str
    action: str


def _f(name: str, base: str, split: str, role: str = "annotations", md5: str | None = None) -> AnnotationFile:
    return AnnotationFile(name, f"{base}/{name}", md5, split, role)


ANNOTATIONS: dict[str, tuple[AnnotationFile, ...]] = {
    "coco": (
        _f("coco_karpathy_train.json", _SFR, "train", md5="aa31ac474cf6250ebb81d18348a07ed8"),
        _f("coco_karpathy_val.json", _SFR, "val", md5="b273847456ef5580e33713b1f7de52a0"),
        _f("coco_karpathy_test.json", _SFR, "test", md5="3ff34b0ef2db02d01c37399f6a2a6cd1"),
        _f("coco_karpathy_val_gt.json", _SFR, "val", "references"),
        _f("coco_karpathy_test_gt.json", _SFR, "test", "references"),
    ),
    "vqav2": (
        _f("vqa_train.json", _SFR, "train"),
        _f("vqa_val.json", _SFR, "train"),  # LAVIS trains on val as well; its held-out list is vqa_val_eval.json
        _f("vqa_val_eval.json", f"{_LAVIS}/vqav2", "val"),
        _f("answer_list.json", f"{_LAVIS}/vqav2", "val", "answer-list"),
        _f("v2_OpenEnded_mscoco_val2014_questions.json", f"{_LAVIS}/vqav2", "val", "eval-questions"),
        _f("v2_mscoco_val2014_annotations.json", f"{_LAVIS}/vqav2", "val", "eval-annotations"),
        AnnotationFile("v2_OpenEnded_mscoco_test-dev2015_questions.json",
                       "https://s3.amazonaws.com/cvmlp/vqa/mscoco/vqa/v2_Questions_Test_mscoco.zip", None, "test-dev",
                       "eval-questions", member="v2_OpenEnded_mscoco_test-dev2015_questions.json"),
    ),
    "okvqa": (
        _f("okvqa_train.json", f"{_LAVIS}/okvqa", "train"),
        _f("okvqa_val_eval.json", f"{_LAVIS}/okvqa", "val"),
        _f("okvqa_answer_list_train.json", f"{_LAVIS}/okvqa", "val", "answer-list"),
        _f("OpenEnded_mscoco_val2014_questions.json", f"{_LAVIS}/okvqa", "val", "eval-questions"),
        _f("mscoco_val2014_annotations.json", f"{_LAVIS}/okvqa", "val", "eval-annotations"),
    ),
    "gqa": (
        _f("train_balanced_questions.json", f"{_LAVIS}/gqa", "train"),
        _f("testdev_balanced_questions.json", f"{_LAVIS}/gqa", "test-dev", "eval-questions"),
        _f("test_balanced_questions.json", f"{_LAVIS}/gqa", "test", "eval-questions"),
    ),
    "nocaps": (
        _f("nocaps_val.json", _SFR, "val"),
        _f("nocaps_test.json", _SFR, "test"),
        _f("nocaps_val_4500_captions.json", "https://s3.amazonaws.com/nocaps", "val", "references"),
    ),
    "flickr30k": (
        _f("flickr30k_train.json", _SFR, "train"),
        _f("flickr30k_val.json", _SFR, "val"),
        _f("flickr30k_test.json", _SFR, "test"),
    ),
    "vg": (
        _f("vg_caption.json", f"{_LAVIS}/visual_genome", "train"),
        _f("vg_qa.json", _SFR, "train"),  # question-answer pairs (BLIP's VQA fine-tuning adds them to VQAv2's)
    ),
}

# `blip2 eval` commands that use prepared files: (command, ((option, file name), ...))
EVAL_HINTS: dict[str, tuple[tuple[str, tuple[tuple[str, str], ...]], ...]] = {
    "coco": (("coco", (("--annotations", "coco_karpathy_test_gt.json"), ("--items", "coco_karpathy_test.json"))),
             ("coco-retrieval", (("--annotations", "coco_karpathy_test.json"),))),
    "vqav2": (("vqav2", (("--questions", "v2_OpenEnded_mscoco_val2014_questions.json"),
                         ("--annotations", "v2_mscoco_val2014_annotations.json"))),
              ("vqav2", (("--questions", "v2_OpenEnded_mscoco_test-dev2015_questions.json"),))),
    "okvqa": (("okvqa", (("--questions", "OpenEnded_mscoco_val2014_questions.json"),
                         ("--annotations", "mscoco_val2014_annotations.json"))),),
    "gqa": (("gqa", (("--questions", "testdev_balanced_questions.json"),)),),
    "nocaps": (("nocaps", (("--annotations", "nocaps_val_4500_captions.json"), ("--items", "nocaps_val.json"))),
               ("nocaps", (("--items", "nocaps_test.json"),))),
    "flickr30k": (("flickr30k", (("--annotations", "flickr30k_test.json"),)),),
    "vg": (),
}


def annotation_files(dataset: str, splits: list[str] | None = None) -> list[AnnotationFile]:
    """The registered files of ``dataset``; ``splits`` keeps those whose split or role is one of them."""
    if dataset not in ANNOTATIONS:
        raise Blip2Error(f"unknown dataset {dataset!r}; known: {', '.join(ANNOTATIONS)}")
    files = list(ANNOTATIONS[dataset])
    if not splits:
        return files
    known = sorted({tag for f in files for tag in f.tags()})
    unknown = [s for s in splits if s not in known]
    if unknown:
        raise Blip2Error(f"{dataset}: no split or role {', '.join(map(repr, unknown))}; choose from {', '.join(known)}")
    return [f for f in files if f.tags() & set(splits)]


def eval_hint(dataset: str, out_dir: Path, available: Collection[str] | None = None) -> list[str]:
    """``blip2 eval ...`` command lines that use the files of ``dataset`` in ``out_dir``.

    With ``available`` (file names), only the lines whose files are all among them.
    """
    annotation_files(dataset)
    lines = []
    for command, options in EVAL_HINTS.get(dataset, ()):
        if available is not None and not all(name in available for _, name in options):
            continue
        args = " ".join(f"{option} {shlex.quote(str(out_dir / name))}" for option, name in options)
        lines.append(f"blip2 eval {command} {args}")
    return lines


def prepare_annotations(dataset: str, out_dir: Path, splits: list[str] | None = None,
                        source_dir: Path | None = None, verify: bool = True) -> list[PreparedFile]:
    """Put the annotation files of ``dataset`` in ``out_dir``: keep, copy from ``source_dir``, or download."""
    files = annotation_files(dataset, splits)
    if source_dir is not None and not source_dir.is_dir():
        raise Blip2Error(f"{source_dir}: no such directory (--from)")
    created = _missing_dirs(out_dir)
    recorded = _read_manifest(out_dir)
    prepared: list[PreparedFile] = []
    try:
        for entry in files:
            prepared.append(_prepare_one(entry, out_dir, source_dir, verify, recorded.get(entry.name)))
    finally:
        if prepared:
            _write_manifest(out_dir, dataset, recorded, prepared)
        else:
            _remove_empty(created)
    return prepared


def prepare_record(dataset: str, out: Path | None, splits: list[str] | None, source: Path | None) -> dict:
    """``prepare_annotations`` into ``out`` (default ``data/<dataset>/annotations``); what was done, as plain data:
    files (path, size, md5, action) and the eval command lines that use them."""
    out = out if out is not None else Path("data") / dataset / "annotations"
    prepared = prepare_annotations(dataset, out, splits=splits or None, source_dir=source)
    files = [{"name": p.name, "path": str(p.path), "url": p.url, "size": p.size, "md5": p.md5, "split": p.split,
              "role": p.role, "action": p.action} for p in prepared]
    return {"dataset": dataset, "out": str(out), "files": files,
            "eval": eval_hint(dataset, out, available={p.name for p in prepared})}


def _missing_dirs(path: Path) -> list[Path]:
    """The directories that writing into ``path`` would create, deepest first."""
    missing = []
    while not path.exists() and path != path.parent:
        missing.append(path)
        path = path.parent
    return missing


def _remove_empty(dirs: list[Path]) -> None:
    """Remove those of ``dirs`` (deepest first) that a failed run created and left empty."""
    for d in dirs:
        try:
            d.rmdir()
        except FileNotFoundError:
            continue
        except OSError:  # not empty: nor are its parents
            return


def _prepare_one(entry: AnnotationFile, out_dir: Path, source_dir: Path | None, verify: bool,
                 recorded: dict | None) -> PreparedFile:
    target = out_dir / entry.name
    url = effective_url(entry.url)
    if target.is_file():
        digest = file_md5(target)
        _checker(entry, verify, f"{target} is corrupt; delete it and run again")(digest)
        if recorded and recorded.get("md5") not in (None, digest):
            print(f"warning: {target} changed since it was prepared (md5 {digest}, manifest {recorded['md5']})",
                  file=sys.stderr)
        return _result(entry, target, url, digest, "kept")
    found = _locate(entry, source_dir) if source_dir is not None else None
    if found is not None:
        check = _checker(entry, verify, f"{found} is corrupt or another version; download it again")
        if entry.member and found.name != entry.name:
            digest = _extract(found, entry.member, target, check)
        else:
            with found.open("rb") as src, atomic_open(target) as dst:
                digest = copy_hashing(src, dst)[0]
                check(digest)
        return _result(entry, target, url, digest, "copied")
    if offline():
        raise _unavailable(entry, url, out_dir,
                           "offline (BLIP2_OFFLINE, HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE is set)")
    try:
        return _result(entry, target, url, _fetch(entry, url, target, verify), "fetched")
    except DownloadFailed as e:
        raise _unavailable(entry, url, out_dir, str(e)) from None


def _checker(entry: AnnotationFile, verify: bool, advice: str) -> Callable[[str], None]:
    """A check of a digest against the registered md5 that raises ``advice`` on a mismatch."""
    def check(digest: str) -> None:
        if verify and entry.md5 and digest != entry.md5:
            raise Blip2Error(f"{advice} (md5 {digest}, expected {entry.md5} for {entry.name})")
    return check


def _result(entry: AnnotationFile, target: Path, url: str, digest: str, action: str) -> PreparedFile:
    return PreparedFile(entry.name, target, url, digest, target.stat().st_size, entry.split, entry.role, action)


def _unavailable(entry: AnnotationFile, url: str, out_dir: Path, reason: str) -> Blip2Error:
    what = f"{url_name(url)} (it holds {entry.member})" if entry.member else entry.name
    return Blip2Error(f"cannot get {entry.name}: {reason}; download {url} and put {what} in {out_dir} "
                      f"(or pass --from DIR, a directory holding it)")


def _locate(entry: AnnotationFile, source_dir: Path) -> Path | None:
    """The hand-downloaded file (or, for a member, its archive) under ``source_dir``, searched recursively."""
    names = [entry.name] + ([url_name(entry.url)] if entry.member else [])
    for name in names:
        matches = sorted(p for p in source_dir.rglob(name) if p.is_file())
        if matches:
            return matches[0]
    return None


def _fetch(entry: AnnotationFile, url: str, target: Path, verify: bool) -> str:
    """Download ``url`` into ``target`` (through its archive when ``entry.member`` is set); the md5 of ``target``."""
    check = _checker(entry, verify, f"{url}: the downloaded file differs from the registered one")
    if not entry.member:
        with atomic_open(target) as f:
            digest = stream(url, f, entry.name)
            check(digest)
        return digest
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, archive = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".zip.part")
    try:
        with os.fdopen(fd, "wb") as f:
            stream(url, f, entry.name)
        return _extract(Path(archive), entry.member, target, check, url_name(url))
    finally:
        Path(archive).unlink(missing_ok=True)


def _extract(archive: Path, member: str, target: Path, check: Callable[[str], None], label: str | None = None) -> str:
    """Copy ``member`` (matched by full or base name) out of a zip archive into ``target``, atomically; its md5."""
    label = label or str(archive)
    try:
        with zipfile.ZipFile(archive) as zf:
            names = [n for n in zf.namelist() if n == member or n.rsplit("/", 1)[-1] == member]
            if not names:
                raise Blip2Error(f"{label}: the archive holds no {member}")
            with zf.open(names[0]) as src, atomic_open(target) as dst:
                digest = copy_hashing(src, dst)[0]
                check(digest)
            return digest
    except (zipfile.BadZipFile, zipfile.LargeZipFile):
        raise Blip2Error(f"{label}: not a valid zip archive (an incomplete download?)") from None


def _read_manifest(out_dir: Path) -> dict[str, dict]:
    path = out_dir / MANIFEST
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return {f["name"]: f for f in data["files"]}
    except (ValueError, KeyError, TypeError):
        print(f"warning: {path} is unreadable; it will be rewritten", file=sys.stderr)
        return {}


def _write_manifest(out_dir: Path, dataset: str, recorded: dict[str, dict], prepared: list[PreparedFile]) -> None:
    """MANIFEST.json: the files prepared now, plus those of earlier runs (other splits) still on disk."""
    records = {name: rec for name, rec in recorded.items() if (out_dir / name).is_file()}
    for p in prepared:
        record = asdict(p)
        for key in ("path", "action"):
            record.pop(key)
        records[p.name] = record
    order = {f.name: i for i, f in enumerate(ANNOTATIONS[dataset])}
    files = sorted(records.values(), key=lambda r: (order.get(r["name"], len(order)), r["name"]))
    with atomic_open(out_dir / MANIFEST) as f:
        f.write((json.dumps({"dataset": dataset, "files": files}, indent=2) + "\n").encode())
