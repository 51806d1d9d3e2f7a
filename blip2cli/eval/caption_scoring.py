"""Captioning metrics computed the way COCOEvalCap computes them, with pycocoevalcap's own classes.

Captions are PTB-tokenised (Stanford CoreNLP 3.4.1, lower-cased, punctuation removed), then scored with
BLEU-1..4, METEOR 1.5, ROUGE-L, CIDEr (document frequencies from the scored references, as COCOEvalCap)
and SPICE. Java runs the tokenizer, METEOR and SPICE. SPICE also needs the Stanford CoreNLP 3.6.0 jars
that pycocoevalcap downloads on first use; without them SPICE is skipped with a note, never downloaded.

NoCaps-style subsets are scored as separate evaluations (CIDEr's document frequencies and BLEU's corpus
statistics come from the subset); SPICE per image does not depend on the other images, so subsets take the
mean of the per-image SPICE scores of one run.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
from collections.abc import Hashable, Iterator, Mapping
from pathlib import Path
from typing import Any

from ..runtime.errors import Blip2Error

BLEU = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4")
METRICS = (*BLEU, "METEOR", "ROUGE_L", "CIDEr", "SPICE")
DOWNLOAD_HINT = "python -c 'from pycocoevalcap.spice.spice import Spice; Spice()'"


def spice_lib_dir() -> Path:
    """Where pycocoevalcap's SPICE looks for (and downloads) the Stanford CoreNLP jars."""
    from pycocoevalcap.spice import get_stanford_models as g

    return Path(g.SPICEDIR) / g.SPICELIB


def spice_missing_reason() -> str | None:
    """None when SPICE can run, else a one-line note saying why not."""
    from pycocoevalcap.spice import get_stanford_models as g

    lib = spice_lib_dir()
    jars = [f"{g.JAR}.jar", f"{g.JAR}-models.jar"]
    if not all((lib / jar).is_file() for jar in jars):
        return (f"SPICE skipped: Stanford CoreNLP jars ({', '.join(jars)}) not found in {lib}; "
                f"run once with network to download them: {DOWNLOAD_HINT}")
    return None


def caption_references(annotations: Any) -> dict[Hashable, list[str]]:
    """image id -> reference captions, in the order of the file's 'images' list (COCO caption format)."""
    if not isinstance(annotations, dict) or not isinstance(annotations.get("annotations"), list):
        raise Blip2Error("annotations: expected COCO caption format (an object with 'images' and 'annotations' lists)")
    images = annotations.get("images")
    refs: dict[Hashable, list[str]] = {}
    if images is not None:
        if not isinstance(images, list) or not all(isinstance(i, dict) and isinstance(i.get("id"), (int, str))
                                                   for i in images):
            raise Blip2Error("annotations: 'images' must be a list of objects with an 'id'")
        refs = {i["id"]: [] for i in images}
    for n, a in enumerate(annotations["annotations"]):
        if not isinstance(a, dict) or not isinstance(a.get("image_id"), (int, str)) \
                or not isinstance(a.get("caption"), str):
            raise Blip2Error(f"annotations: item {n} is not an object with an 'image_id' and a string 'caption'")
        if images is not None and a["image_id"] not in refs:
            raise Blip2Error(f"annotations: a caption for image id {a['image_id']!r}, which 'images' does not list")
        refs.setdefault(a["image_id"], []).append(a["caption"])
    return refs


def domain_subsets(annotations: Any) -> dict[str, set[Hashable]] | None:
    """NoCaps subsets from the images' 'domain' field (in-domain, near-domain, out-domain), if every image has one."""
    images = annotations.get("images") if isinstance(annotations, dict) else None
    if not images or not all(isinstance(i, dict) and "domain" in i for i in images):
        return None
    subsets: dict[str, set[Hashable]] = {}
    for image in images:
        subsets.setdefault(str(image["domain"]), set()).add(image["id"])
    return dict(sorted(subsets.items()))


def _id_hint(image_id: Any, known: Mapping[Hashable, Any]) -> str:
    for k in known:
        if str(k) == str(image_id):
            return f" (the annotations have it as {type(k).__name__} {k!r})"
    return ""


def _predicted_captions(predictions: Any, refs: Mapping[Hashable, list[str]]) -> tuple[dict[Hashable, str], int]:
    """image id -> caption; an image predicted twice keeps its first caption (the count is returned)."""
    if not isinstance(predictions, list):
        raise Blip2Error('predictions: expected a JSON list of {"image_id", "caption"} objects')
    captions: dict[Hashable, str] = {}
    unknown: list[Any] = []
    repeated = 0
    for n, p in enumerate(predictions):
        if not isinstance(p, dict) or not isinstance(p.get("image_id"), (int, str)) \
                or not isinstance(p.get("caption"), str):
            raise Blip2Error(f"predictions: item {n} is not an object with an 'image_id' and a string 'caption'")
        image_id = p["image_id"]
        if image_id not in refs:
            unknown.append(image_id)
        elif image_id in captions:
            repeated += 1
        else:
            captions[image_id] = p["caption"]
    if unknown:
        raise Blip2Error(f"prediction for image id {unknown[0]!r}: not in the annotations{_id_hint(unknown[0], refs)} "
                         f"({len(unknown)} of {len(predictions)} predictions have unknown ids)")
    return captions, repeated


@contextlib.contextmanager
def _child_stdout_to_stderr() -> Iterator[None]:
    """SPICE's Java process inherits file descriptor 1; keep stdout clean for --json."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def _score(gts: dict, res: dict, meteor) -> dict[str, float]:
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    scores = {name: float(value) for name, value in zip(BLEU, bleu)}
    scores["METEOR"] = float(meteor.compute_score(gts, res)[0])
    scores["ROUGE_L"] = float(Rouge().compute_score(gts, res)[0])
    scores["CIDEr"] = float(Cider().compute_score(gts, res)[0])
    return scores


def _spice(gts: dict, res: dict) -> tuple[float, dict[Hashable, float]]:
    """SPICE over all images and per image (pycocoevalcap reports images in sorted id order)."""
    from pycocoevalcap.spice.spice import Spice

    with _child_stdout_to_stderr():
        average, per_image = Spice().compute_score(gts, res)
    return float(average), {i: float(s["All"]["f"]) for i, s in zip(sorted(gts), per_image)}


def score_captions(predictions: list[dict], annotations: dict, spice: bool = True, *,
                   subsets: Mapping[str, set[Hashable]] | None = None, allow_missing: bool = False) -> dict:
    """BLEU-1..4, METEOR, ROUGE_L, CIDEr (and SPICE when it can run) as COCOEvalCap computes them.

    ``predictions``: ``[{"image_id", "caption"}]``; ``annotations``: COCO caption format. Every annotated image
    needs a prediction unless ``allow_missing``. With ``subsets`` (name -> image ids, e.g. NoCaps domains) the
    result also holds ``"subsets": {name: metrics}``. Anything skipped is explained in ``"notes"``.
    """
    import numpy as np
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    refs = caption_references(annotations)
    captions, repeated = _predicted_captions(predictions, refs)
    notes = [f"{repeated} repeated image ids in the predictions: the first caption of each counts"] if repeated else []
    missing = [i for i in refs if i not in captions]
    if missing and not allow_missing:
        raise Blip2Error(f"no prediction for image id {missing[0]!r} ({len(missing)} of {len(refs)} images have none; "
                         "--allow-missing scores the predicted ones)")
    ids = [i for i in refs if i in captions]
    if not ids:
        raise Blip2Error("predictions: none to score")
    if missing:
        notes.append(f"scored {len(ids)} of {len(refs)} images: {len(missing)} have no prediction")
    for i in ids:
        if not refs[i]:
            raise Blip2Error(f"annotations: image id {i!r} has no reference captions")
    groups: dict[str, list[Hashable]] = {}
    for name, members in (subsets or {}).items():
        outside = [i for i in members if i not in refs]
        if outside:
            raise Blip2Error(f"subset {name!r}: image id {outside[0]!r} is not in the annotations")
        groups[name] = [i for i in ids if i in members]
    if shutil.which("java") is None:
        raise Blip2Error("captioning metrics need Java (PTB tokenizer, METEOR, SPICE): install a Java runtime, "
                         "e.g. apt-get install default-jre-headless")

    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize({i: [{"caption": c} for c in refs[i]] for i in ids})
    res = tokenizer.tokenize({i: [{"caption": captions[i]}] for i in ids})
    spice_reason = spice_missing_reason() if spice else "SPICE not requested"
    spice_scores: dict[Hashable, float] = {}
    spice_all = None
    if spice_reason is None:
        try:
            spice_all, spice_scores = _spice(gts, res)
        except (subprocess.CalledProcessError, OSError) as e:
            spice_reason = f"SPICE failed: {type(e).__name__}: {(str(e).splitlines() or [''])[0]}"
    if spice and spice_reason:
        notes.append(spice_reason)

    meteor = Meteor()
    try:
        result: dict[str, Any] = _score(gts, res, meteor)
        if spice_all is not None:
            result["SPICE"] = spice_all
        result["num_images"] = len(ids)
        if subsets is not None:
            result["subsets"] = {}
            for name, members in groups.items():
                if not members:
                    result["subsets"][name] = {"num_images": 0}
                    notes.append(f"subset {name!r}: no predicted images")
                    continue
                sub = _score({i: gts[i] for i in members}, {i: res[i] for i in members}, meteor)
                if spice_all is not None:
                    sub["SPICE"] = float(np.mean([spice_scores[i] for i in sorted(members)]))
                result["subsets"][name] = {**sub, "num_images": len(members)}
    finally:
        if meteor.lock.locked():  # left held by a failed compute_score; __del__ would wait on it forever
            meteor.lock.release()
        del meteor  # its __del__ stops the METEOR Java process
    result["notes"] = notes
    return result
