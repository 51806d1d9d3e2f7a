"""What made a run's predictions: ``runs/<name>/provenance.json``, written before the first prediction.

An eval run directory holds the work of one model on one benchmark, with one set of decoding settings,
dtype and inputs (``made_by``). A rerun with the same ``made_by`` continues where the last one stopped;
one with another is refused in one line naming what differs, unless ``--overwrite`` discards the old work.

A model is known by what it resolves to, not by what was typed: a local path by the real path of the
checkpoint it designates (a run directory or its ``latest`` by the step it points at), a hub model by its
id and the commit of its cached snapshot, a LAVIS registry file by its cached path. Its weights are
fingerprinted cheaply: a blip2 checkpoint by the SHA-256 values its ``manifest.json`` already holds, other
local files by their content when small and by (size, mtime_ns) when large, so that a 15 GB model costs a
few ``stat`` calls, not minutes of hashing.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
from pathlib import Path
from typing import Any

from ..runtime.errors import Blip2Error
from ..runtime.io import atomic_write_text

FILE = "provenance.json"
FORMAT = "blip2-eval-provenance"
SMALL_FILE = 64 << 20  # files up to 64 MiB are hashed; larger ones are known by size and mtime_ns
# a run's work (metrics.json: what earlier versions wrote in place of results.json, discarded with the rest)
WORK = ("predictions.rank*.jsonl", "predictions.json", "itc.pt", "itm.rank*.pt", "results.json", "metrics.json")
_LABEL = re.compile(r"[^A-Za-z0-9._-]+")


# --------------------------------------------------------------------------- the model


def identify(name: str, llm: str | None = None) -> tuple[str, dict[str, Any]]:
    """A label for run names and the identity of the model ``name`` designates (resolved as loading does)."""
    from ..models import registry
    from ..models.resolve import blip2_entry, resolve_path
    from ..models.hub import is_hub_id
    from ..runtime.download import cached_download

    path = Path(name).expanduser()
    if path.exists() or path.is_symlink():
        label, identity = _local(resolve_path(path))
        if identity["source"].endswith((".pth", ".pt", ".bin")):
            identity["llm"] = _llm(llm)
        return label, identity
    entry = blip2_entry(name)
    if entry is not None and entry.source.startswith("lavis:"):
        file = cached_download(entry.where).resolve()
        return entry.name, {"source": str(file), **_weights(file), "llm": _llm(llm or entry.llm)}
    repo = entry.where if entry is not None else name
    if entry is None and not is_hub_id(name):
        raise registry.unknown_name(name)
    known = entry or registry.by_repo(repo)
    return (known.name if known is not None else repo.replace("/", "--")), _hub(repo)


def _local(target: Path) -> tuple[str, dict[str, Any]]:
    """A local checkpoint (already resolved through any run directory or ``latest``)."""
    from ..models.formats.native import FORMAT_FILE, is_ours

    real = target.resolve()
    identity: dict[str, Any] = {"source": str(real), **_weights(real)}
    if real.is_dir() and is_ours(real):
        frozen = _frozen_sources(real / FORMAT_FILE)
        if frozen:
            identity["frozen"] = frozen
    return _label(real), identity


def _label(real: Path) -> str:
    """``<run>-step-NNNNNN`` for a training checkpoint, else the directory name or the file's stem."""
    from ..runtime.rundir import step_of

    if step_of(real) is not None:
        text = f"{real.parent.name}-{real.name}"
    else:
        text = real.name if real.is_dir() else real.stem
    return _LABEL.sub("-", text).strip("-") or "model"


def _frozen_sources(meta_file: Path) -> dict[str, str]:
    """The frozen parts a blip2 checkpoint refers to by name (its weights do not hold them)."""
    try:
        meta = json.loads(meta_file.read_text())
    except (OSError, ValueError):
        return {}  # loading reports it
    sources = meta.get("frozen_sources") if isinstance(meta, dict) else None
    return dict(sources) if isinstance(sources, dict) else {}


def _hub(repo: str) -> dict[str, Any]:
    """A hub model: its id and the commit of the snapshot the cache holds (fetched first if not cached)."""
    from ..models.hub import hub_snapshot

    snapshot = hub_snapshot(repo)
    if snapshot.parent.name == "snapshots":
        return {"source": repo, "revision": snapshot.name}
    return {"source": repo, **_weights(snapshot.resolve())}


def _llm(llm: str | None) -> str | None:
    """The ``--llm`` of a LAVIS file: a local directory by its real path, a name as given."""
    if llm is None:
        return None
    path = Path(llm).expanduser()
    return str(path.resolve()) if path.exists() else llm


def _weights(real: Path) -> dict[str, str]:
    """A fingerprint of the model's files: the manifest's SHA-256 values where there is a manifest."""
    from ..integrity import read_manifest

    manifest = read_manifest(real) if real.is_dir() else None
    if manifest is not None:
        files = {name: entry.get("sha256") for name, entry in manifest["files"].items()
                 if not name.startswith("trainer/")}
        return {"weights": _digest(files), "weights_from": "manifest"}
    files = {real.name: _mark(real)} if real.is_file() else {
        p.relative_to(real).as_posix(): _mark(p) for p in _model_files(real)}
    return {"weights": _digest(files), "weights_from": "files"}


def _model_files(root: Path) -> list[Path]:
    """The files of a model directory: its own and its tokenizers' (not a training checkpoint's trainer state).
    A directory that is no model has none: loading it is refused, and it may be large."""
    from ..models.formats.native import FORMAT_FILE

    if not ((root / FORMAT_FILE).is_file() or (root / "config.json").is_file()):
        return []
    folders = [root, *(root / name for name in ("tokenizer", "qformer_tokenizer") if (root / name).is_dir())]
    return sorted(p for folder in folders for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))


def _mark(path: Path) -> str:
    """A small file's SHA-256; a large one's size and modification time (any rewrite changes them)."""
    stat = path.stat()
    if stat.st_size > SMALL_FILE:
        return f"size {stat.st_size} mtime_ns {stat.st_mtime_ns}"
    from ..integrity import sha256_file

    return f"sha256 {sha256_file(path)}"


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


# --------------------------------------------------------------------------- the record


def record(benchmark: str, identity: dict[str, Any], dtype: str, settings: dict[str, Any],
           inputs: dict[str, Path | None]) -> dict[str, Any]:
    """The provenance of a run: ``made_by`` (compared on a rerun) and, for people, the command and version."""
    from ..runtime import __version__
    from ..runtime.rundir import command_line

    made_by = {"benchmark": benchmark, "model": identity, "dtype": dtype, "settings": settings,
               "inputs": {option: _input(path) for option, path in inputs.items() if path is not None}}
    return {"format": FORMAT, "version": 1, "made_by": json.loads(json.dumps(made_by)),
            "command": " ".join(command_line()), "blip2": __version__}


def _input(path: Path) -> dict[str, Any] | str:
    """A benchmark input: a file by its real path and size, a directory (the image root) by its real path."""
    real = path.resolve()
    return str(real) if real.is_dir() else {"path": str(real), "size": real.stat().st_size}


def read(directory: Path) -> tuple[dict[str, Any] | None, str]:
    """The provenance a run directory holds, or None and why not."""
    path = directory / FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None, f"no {FILE}: written by an older blip2 or by other means"
    except (OSError, ValueError) as e:
        return None, f"{path} is unreadable ({e.__class__.__name__})"
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("made_by"), dict):
        return None, f"{path} is not a blip2 eval provenance file"
    return data, ""


def holds_work(directory: Path) -> list[Path]:
    """The predictions, scores and results in a run directory."""
    return sorted(p for pattern in WORK for p in directory.glob(pattern) if p.is_file())


# --------------------------------------------------------------------------- the run directory


def default_dir(out: Path, benchmark: str, label: str, rec: dict[str, Any]) -> Path:
    """``<out>/<benchmark>-<label>``, or, when that holds another model's work, the same name with a short hash
    of this model's identity: different models never share a default run directory."""
    plain = out / f"{benchmark}-{label}"
    if not holds_work(plain):
        return plain
    held, _ = read(plain)
    if held is not None and held["made_by"].get("model") == rec["made_by"]["model"]:
        return plain
    return out / f"{benchmark}-{label}-{_digest(rec['made_by']['model'])[:8]}"


def check(directory: Path, rec: dict[str, Any], what: str, overwrite: bool) -> None:
    """Refuse a run directory that holds work made otherwise than ``rec`` says (not with ``overwrite``)."""
    if overwrite or not holds_work(directory):
        return
    advice = "choose another --name, or add --overwrite to discard them"
    held, why = read(directory)
    if held is None:
        raise Blip2Error(f"{directory} holds {what} of unknown origin ({why}): {advice}")
    difference = differences(held["made_by"], rec["made_by"])
    if difference is not None:
        raise Blip2Error(f"{directory} holds {what} {difference[0]}; this run uses {difference[1]}: {advice}")


def claim(directory: Path, rec: dict[str, Any], overwrite: bool) -> None:
    """Make ``directory`` this run's (rank 0, after ``check``): with ``overwrite`` discard its work, then write
    the provenance unless the directory's work already has the same one."""
    if overwrite:
        discard(directory)
    if not holds_work(directory) or not (directory / FILE).is_file():
        directory.mkdir(parents=True, exist_ok=True)
        atomic_write_text(directory / FILE, json.dumps(rec, indent=2) + "\n")


def discard(directory: Path) -> None:
    """Delete a run directory's predictions, scores, results and provenance, saying so on stderr."""
    files = holds_work(directory)
    for path in [*files, directory / FILE]:
        path.unlink(missing_ok=True)
    if files:
        print(f"--overwrite: discarded {len(files)} file(s) of earlier work in {directory}", file=sys.stderr)


# --------------------------------------------------------------------------- messages


def differences(old: dict[str, Any], new: dict[str, Any]) -> tuple[str, str] | None:
    """How the work held differs from this run, as ("of MODEL" | "made with ...", "..."); None if alike."""
    if old == new:
        return None
    if old.get("model") != new.get("model"):
        before, after = describe_model(old.get("model")), describe_model(new.get("model"))
        if before == after:
            before, after = _changed({"model": old.get("model")}, {"model": new.get("model")})
        return f"of {before}", after
    before, after = _changed(old, new)
    return f"made with {before}", after


def describe_model(identity: Any) -> str:
    """``SOURCE@REVISION`` or ``SOURCE (weights 3f2a1c0b…)``, with the LLM of a LAVIS file."""
    if not isinstance(identity, dict):
        return "an unknown model"
    text = str(identity.get("source"))
    if identity.get("revision"):
        text += f"@{str(identity['revision'])[:12]}"
    elif identity.get("weights"):
        text += f" (weights {str(identity['weights'])[:8]}…)"
    if identity.get("llm"):
        text += f" with LLM {identity['llm']}"
    return text


def _changed(old: dict[str, Any], new: dict[str, Any]) -> tuple[str, str]:
    """The differing leaves of two records, as "key=value, ..." for each side (settings and inputs unprefixed)."""
    before: list[str] = []
    after: list[str] = []
    for key in [*old, *(k for k in new if k not in old)]:
        if old.get(key) != new.get(key):
            _collect(old.get(key), new.get(key), "" if key in ("settings", "inputs") else key, before, after)
    return ", ".join(before) or "nothing", ", ".join(after) or "nothing"


def _collect(old: Any, new: Any, prefix: str, before: list[str], after: list[str]) -> None:
    if isinstance(old, dict) and isinstance(new, dict) and not _is_file(old) and not _is_file(new):
        for key in [*old, *(k for k in new if k not in old)]:
            if old.get(key) != new.get(key):
                _collect(old.get(key), new.get(key), f"{prefix}.{key}" if prefix else key, before, after)
        return
    before.append(f"{prefix}={_show(old)}")
    after.append(f"{prefix}={_show(new)}")


def _is_file(value: Any) -> bool:
    return isinstance(value, dict) and set(value) == {"path", "size"}


def _show(value: Any) -> str:
    if _is_file(value):
        return f"{value['path']} ({value['size']} bytes)"
    if value is None:
        return "none"
    return value if isinstance(value, str) else json.dumps(value)
