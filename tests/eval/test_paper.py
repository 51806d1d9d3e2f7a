"""The paper's figures in the eval recipes: registry models and reported metrics only, the row a result is
compared with, and the comparison in the units blip2 reports."""

from __future__ import annotations

import re

import pytest

from blip2cli.config import load_recipe, recipes_root
from blip2cli.eval.caption_scoring import METRICS
from blip2cli.eval.generation import GenerationEval
from blip2cli.eval.paper import choose
from blip2cli.eval.retrieval import RetrievalEval
from blip2cli.models import registry
from blip2cli.runtime.errors import Blip2Error

RETRIEVAL = ("flickr30k", "coco-retrieval")
NOCAPS_DOMAINS = ("in-domain", "near-domain", "out-domain")  # the 'domain' of NoCaps's images


def recipe(benchmark: str):
    return load_recipe(RetrievalEval if benchmark in RETRIEVAL else GenerationEval, f"eval/{benchmark}")


def reported(benchmark: str) -> set[str]:
    """The metrics the benchmark's scorer reports, as the ``paper`` figures name them."""
    import torch

    from blip2cli.eval.retrieval import RetrievalScores, recall_metrics
    from blip2cli.eval.vqa_scoring import score_gqa, score_vqa
    from tests.eval.test_vqa_scoring import GQA_PREDICTIONS, GQA_QUESTIONS, vqa_files

    if benchmark in RETRIEVAL:
        one = torch.zeros(1, 1, dtype=torch.long)
        result = recall_metrics(RetrievalScores(one, one.float(), one, one.float()), [[0]], [0])
    elif benchmark in ("vqav2", "okvqa"):
        result = score_vqa(*vqa_files())
    elif benchmark == "gqa":
        result = score_gqa(GQA_PREDICTIONS, GQA_QUESTIONS)
    else:
        domains = NOCAPS_DOMAINS if benchmark == "nocaps" else ()
        return {*METRICS, *(f"{domain}/{metric}" for domain in domains for metric in METRICS)}
    return {key for key, value in result.items() if isinstance(value, float)}


@pytest.mark.parametrize("benchmark", sorted(p.stem for p in (recipes_root() / "eval").glob("*.yaml")))
def test_paper_figures_name_registry_models_and_reported_metrics(benchmark):
    spec = recipe(benchmark)
    assert spec.paper.table.startswith("Table ") and spec.paper.split and spec.paper.models
    if spec.zero_shot.model:  # --zero-shot always shows the paper's figure
        assert spec.zero_shot.model in spec.paper.models
    metrics = reported(benchmark)
    for name, row in spec.paper.models.items():
        assert registry.lookup(name, "blip2") is not None, name
        assert row.row.startswith("BLIP-2 ") and row.figures, name
        assert set(row.figures) <= metrics, (name, set(row.figures) - metrics)
        # as the paper prints them: percentages, caption metrics x 100 (never blip2's fractions)
        assert all(1 < value < 200 for value in row.figures.values()), name


def test_a_typo_in_a_paper_block_is_an_error(tmp_path):
    bad = {"tabel: Table 2": "unknown key 'tabel'; did you mean 'table'?",
           "models: {blip2-opt-2.7: {row: x, figures: {accuracy: 1}}}": "not a BLIP-2 model of the registry; did "
                                                                       "you mean blip2-opt-2.7b?",
           "models: {blip2-opt-2.7b: {row: x, figures: {accuracy: high}}}": "figures.accuracy: expected a number",
           "models: {blip2-opt-2.7b: {row: x, figurs: {accuracy: 1}}}": "unknown key 'figurs'"}
    for block, message in bad.items():
        path = tmp_path / "r.yaml"
        path.write_text(f"batch_size: 1\npaper:\n  {block}\n")
        with pytest.raises(Blip2Error, match=re.escape(message)):
            load_recipe(GenerationEval, str(path))


def test_the_row_is_the_registry_model_run_unless_paper_names_one(tmp_path):
    figures = recipe("vqav2").paper
    assert choose(figures, None, "blip2-flan-t5-xl", "vqav2").model == "blip2-flan-t5-xl"
    assert choose(figures, None, "Salesforce/blip2-opt-2.7b", "vqav2").model == "blip2-opt-2.7b"  # its hub id
    assert choose(figures, None, "blip2-opt-2.7b-coco", "vqav2") is None  # no figure for it in the table
    assert choose(figures, None, None, "vqav2") is None  # --predictions
    local = tmp_path / "blip2-flan-t5-xl"
    local.mkdir()
    assert choose(figures, None, str(local), "vqav2") is None  # a local checkpoint, whatever its name
    assert choose(figures, "blip2-opt-6.7b", str(local), "vqav2").model == "blip2-opt-6.7b"
    with pytest.raises(Blip2Error, match=r"^--paper blip2-itm-vit-g-coco: the paper has no vqav2 figures for it; "
                                         r"choose blip2-opt-2.7b, .*blip2-flan-t5-xl"):
        choose(figures, "blip2-itm-vit-g-coco", None, "vqav2")


def test_caption_figures_are_compared_as_fractions_and_shown_x100(capsys):
    """NoCaps: the recipe's figures are printed x 100; the result and the ``paper`` entry hold fractions and the
    table shows both x 100, per subset too."""
    from blip2cli.cli.eval import render_captions

    printed = recipe("nocaps").paper.models["blip2-flan-t5-xl-coco"].figures
    scores = {"CIDEr": 1.1, "SPICE": 0.14, "num_images": 3}
    result = {**scores, "subsets": {domain: dict(scores) for domain in NOCAPS_DOMAINS}}
    result["paper"] = choose(recipe("nocaps").paper, None, "blip2-flan-t5-xl-coco", "nocaps", 100).compare(result)
    assert result["paper"]["figures"] == {key: pytest.approx(value / 100) for key, value in printed.items()}
    assert result["paper"]["difference"]["out-domain/CIDEr"] == pytest.approx(1.1 - printed["out-domain/CIDEr"] / 100)
    render_captions(result)
    out, err = capsys.readouterr()
    rows = {line.split()[0]: line.split()[1:] for line in err.splitlines() if line.strip()}
    header = ["100", "overall", "paper", "Δ", *(part for d in NOCAPS_DOMAINS for part in (d, "paper", "Δ"))]
    assert out == "" and rows["x"] == header
    cider = [printed[key] for key in ("CIDEr", *(f"{d}/CIDEr" for d in NOCAPS_DOMAINS))]
    assert rows["CIDEr"] == [part for figure in cider for part in ("110.0", f"{figure:.1f}", f"{110 - figure:+.1f}")]
    assert rows["paper:"] == ["Table", "3,", "BLIP-2", "ViT-g", "FlanT5-XL,", "NoCaps", "val"]
