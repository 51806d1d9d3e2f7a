"""Captioning metrics equal pycocoevalcap's COCOEvalCap run directly; SPICE notes; NoCaps subsets; the CLI."""

from __future__ import annotations

import contextlib
import io
import json

import pytest

from blip2cli.runtime.errors import Blip2Error
from blip2cli.eval import caption_scoring
from blip2cli.eval.caption_scoring import score_captions

from tests.helpers import invoke

GT = {
    "images": [{"id": 391895, "domain": "in-domain"}, {"id": 522418, "domain": "in-domain"},
               {"id": 184613, "domain": "out-domain"}],
    "annotations": [
        {"image_id": 391895, "id": 1, "caption": "A man with a red helmet on a small moped on a dirt road."},
        {"image_id": 391895, "id": 2, "caption": "Man riding a motor bike on a dirt road on the countryside."},
        {"image_id": 391895, "id": 3, "caption": "A man riding on the back of a motorcycle."},
        {"image_id": 522418, "id": 4, "caption": "A woman wearing a net on her head cutting a cake."},
        {"image_id": 522418, "id": 5, "caption": "A woman cutting a large white sheet cake."},
        {"image_id": 522418, "id": 6, "caption": "A woman wearing a hair net cutting a large sheet cake."},
        {"image_id": 522418, "id": 7, "caption": "there is a woman that is cutting a white cake"},
        {"image_id": 184613, "id": 8, "caption": "A child holding a flowered umbrella and petting a yak."},
        {"image_id": 184613, "id": 9, "caption": "A young man holding an umbrella next to a herd of cattle."},
        {"image_id": 184613, "id": 10,
         "caption": "a young boy barefoot holding an umbrella touching the horn of a cow"},
        {"image_id": 184613, "id": 11, "caption": "A young boy with an umbrella who is touching the horn of a cow."},
        {"image_id": 184613, "id": 12, "caption": "A boy holding an umbrella while standing next to livestock."},
    ],
}
PREDICTIONS = [
    {"image_id": 391895, "caption": "a man riding a motorcycle on a dirt road"},
    {"image_id": 522418, "caption": "a woman cutting a cake with a knife."},
    {"image_id": 184613, "caption": "a boy with an umbrella standing next to a cow"},
]
METRICS = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr")
SUBSETS = {"in-domain": {391895, 522418}, "out-domain": {184613}}


class NoSpice:
    """Stands in for SPICE inside COCOEvalCap: its CoreNLP jars are not on this machine."""

    def compute_score(self, gts, res):
        return 0.0, [0.0] * len(gts)

    def method(self):
        return "SPICE"


@pytest.fixture(scope="module")
def shared_meteor():
    """One METEOR process (about 4 s to start) for every scorer in this module, ours and COCOEvalCap's."""
    from pycocoevalcap.meteor import meteor as meteor_module

    instance = meteor_module.Meteor()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(meteor_module, "Meteor", lambda: instance)
        mp.setattr("pycocoevalcap.eval.Meteor", lambda: instance)
        mp.setattr("pycocoevalcap.eval.Spice", NoSpice)
        yield instance


@pytest.fixture(scope="module")
def reference(shared_meteor, tmp_path_factory):
    """COCOEvalCap run directly (COCO + loadRes from JSON files) over all images and over each subset."""
    from pycocoevalcap.eval import COCOEvalCap
    from pycocotools.coco import COCO

    root = tmp_path_factory.mktemp("coco")
    (root / "gt.json").write_text(json.dumps(GT))
    (root / "res.json").write_text(json.dumps(PREDICTIONS))
    scores = {}
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(root / "gt.json"))
        for name, ids in {"overall": None, **SUBSETS}.items():
            evaluator = COCOEvalCap(coco, coco.loadRes(str(root / "res.json")))
            if ids is not None:
                evaluator.params["image_id"] = [i for i in coco.getImgIds() if i in ids]
            evaluator.evaluate()
            scores[name] = evaluator.eval
    return scores


@pytest.fixture
def no_spice_jars(monkeypatch, tmp_path):
    empty = tmp_path / "spice-lib"
    empty.mkdir()
    monkeypatch.setattr(caption_scoring, "spice_lib_dir", lambda: empty)
    return empty


def test_equals_cocoevalcap_and_notes(shared_meteor, reference, no_spice_jars):
    repeated = PREDICTIONS + [{"image_id": 391895, "caption": "a cat"}]  # the first caption counts
    result = score_captions(repeated, GT)
    for metric in METRICS:
        assert result[metric] == reference["overall"][metric], metric
    assert "SPICE" not in result and result["num_images"] == 3
    assert result["notes"][0] == "1 repeated image ids in the predictions: the first caption of each counts"
    assert result["notes"][1].startswith(f"SPICE skipped: Stanford CoreNLP jars (stanford-corenlp-3.6.0.jar, "
                                         f"stanford-corenlp-3.6.0-models.jar) not found in {no_spice_jars}; "
                                         "run once with network")
    assert len(result["notes"]) == 2 and all("\n" not in n for n in result["notes"])


def test_nocaps_cli_subsets_equal_separate_scoring(shared_meteor, reference, no_spice_jars, tmp_path):
    (tmp_path / "gt.json").write_text(json.dumps(GT))
    (tmp_path / "preds.json").write_text(json.dumps(PREDICTIONS))
    (tmp_path / "subsets.json").write_text(json.dumps({k: sorted(v) for k, v in SUBSETS.items()}))
    base = ["nocaps", "--predictions", str(tmp_path / "preds.json"), "--annotations", str(tmp_path / "gt.json"),
            "--json"]
    outputs = []
    for extra in (["--subsets", str(tmp_path / "subsets.json")], []):  # explicit file, then the 'domain' field
        run = invoke("eval", *base, *extra)
        assert run.exit_code == 0, run.output
        assert len(run.stdout.splitlines()) == 1
        outputs.append(json.loads(run.stdout))
    assert outputs[0] == outputs[1]
    result = outputs[0]
    assert set(result["subsets"]) == set(SUBSETS)
    for name, ids in SUBSETS.items():
        assert result["subsets"][name]["num_images"] == len(ids)
        for metric in METRICS:
            assert result["subsets"][name][metric] == reference[name][metric]
    for metric in METRICS:
        assert result[metric] == reference["overall"][metric]


def test_spice_when_available_is_reported_overall_and_per_subset(shared_meteor, monkeypatch):
    per_image = {391895: 0.1, 522418: 0.2, 184613: 0.6}
    monkeypatch.setattr(caption_scoring, "spice_missing_reason", lambda: None)
    monkeypatch.setattr(caption_scoring, "_spice", lambda gts, res: (0.3, per_image))
    result = score_captions(PREDICTIONS, GT, subsets=SUBSETS)
    assert result["SPICE"] == 0.3 and result["notes"] == []
    assert result["subsets"]["in-domain"]["SPICE"] == pytest.approx(0.15)
    assert result["subsets"]["out-domain"]["SPICE"] == pytest.approx(0.6)


def test_cli_table_lists_overall_and_subsets(shared_meteor, monkeypatch, tmp_path):
    monkeypatch.setattr(caption_scoring, "spice_missing_reason", lambda: None)
    monkeypatch.setattr(caption_scoring, "_spice", lambda gts, res: (0.3, {391895: 0.1, 522418: 0.2, 184613: 0.6}))
    (tmp_path / "gt.json").write_text(json.dumps(GT))
    (tmp_path / "preds.json").write_text(json.dumps(PREDICTIONS))
    run = invoke("eval", "nocaps", "--predictions", tmp_path / "preds.json", "--annotations", tmp_path / "gt.json")
    assert run.exit_code == 0, run.output
    assert run.stdout == ""  # the table is on stderr: stdout is for --json
    rows = {line.split()[0]: line.split()[1:] for line in run.stderr.splitlines() if line.strip()}
    assert rows["x"] == ["100", "overall", "in-domain", "out-domain"]
    assert rows["SPICE"] == ["30.0", "15.0", "60.0"] and rows["images"] == ["3", "2", "1"]
    assert set(METRICS) < set(rows)


def test_bad_predictions_are_one_line_errors():
    with pytest.raises(Blip2Error, match=r"image id 42: not in the annotations \(1 of 4 predictions"):
        score_captions(PREDICTIONS + [{"image_id": 42, "caption": "x"}], GT)
    with pytest.raises(Blip2Error, match=r"image id '391895': not in the annotations \(the annotations have it as int"):
        score_captions([{"image_id": "391895", "caption": "x"}], GT)
    with pytest.raises(Blip2Error, match="no prediction for image id 184613"):
        score_captions(PREDICTIONS[:2], GT)
    with pytest.raises(Blip2Error, match="predictions: item 0"):
        score_captions([{"image_id": 391895, "text": "x"}], GT)
    with pytest.raises(Blip2Error, match="annotations: expected COCO caption format"):
        score_captions(PREDICTIONS, {"images": []})
    with pytest.raises(Blip2Error, match="subset 'x': image id 7"):
        score_captions(PREDICTIONS, GT, subsets={"x": {7}})


def test_cli_coco_bad_annotations_file_is_named(tmp_path):
    (tmp_path / "preds.json").write_text(json.dumps(PREDICTIONS))
    (tmp_path / "gt.json").write_text(json.dumps({"annotations": "nope"}))
    run = invoke("eval", "coco", "--predictions", tmp_path / "preds.json", "--annotations", tmp_path / "gt.json",
                 "--json")
    assert isinstance(run.exception, Blip2Error)
    assert str(run.exception).startswith(f"{tmp_path / 'gt.json'}: expected COCO caption format")
    assert run.stdout == ""
