"""VQA accuracy against hand-computed values (official 2021 algorithm and LAVIS's copy), GQA, the eval CLI."""

from __future__ import annotations

import json

import pytest

from blip2cli.runtime.errors import Blip2Error
from blip2cli.eval import vqa_scoring as vqa
from blip2cli.eval.vqa_scoring import normalize_answer, process_punctuation, score_gqa, score_vqa

from tests.helpers import assert_one_line_error, blip2, invoke


def gt(*groups: tuple[int, str]) -> list[dict]:
    """Ten official-style answer records from (count, answer) groups."""
    answers = [a for count, a in groups for _ in range(count)]
    assert len(answers) == 10
    return [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1} for i, a in enumerate(answers)]


# question id -> (answer type, question type, GT answers, prediction, official accuracy, LAVIS accuracy)
# Notation: a GT answer "held out" leaves 9 others; its subset scores min(1, matches among the 9 / 3);
# the question's accuracy is the mean over the 10 held-out answers.
CASES = {
    # unanimous GT, prediction with a trailing newline: whitespace is cleaned on both sides.
    # every held-out "yes" leaves 9 matches -> min(1, 9/3) = 1 -> 1.0 (LAVIS: same)
    1: ("yes/no", "is the", gt((10, "yes")), "yes\n", 1.0, 1.0),
    # unanimous GT: the official code does not normalise, so "Yes." != "yes" -> 0.
    # LAVIS always normalises the prediction: "Yes." -> "yes" -> 9 matches per held-out -> 1.0
    2: ("yes/no", "is the", gt((10, "yes")), "Yes.", 0.0, 1.0),
    # split 4/3/3: official maps "two" -> "2", so 7 x "2" and 3 x "3"; prediction "2".
    # held-out "2" (7 of them): 6 matches -> 1; held-out "3" (3): 7 matches -> 1 -> 1.0
    # LAVIS leaves GT "two" as is: 3 x "2" match. held-out "2" (3): 2 matches -> 2/3; the other 7: 3 -> 1
    # -> (3 * 2/3 + 7 * 1) / 10 = 9/10
    3: ("number", "how many", gt((4, "two"), (3, "2"), (3, "3")), "2", 1.0, 0.9),
    # "1,000": a digit-comma-digit makes processPunctuation drop all punctuation -> "1000" on both sides.
    # 8 x "1000", 2 x "100": held-out "1000" (8): 7 matches -> 1; held-out "100" (2): 8 -> 1 -> 1.0 (LAVIS too)
    4: ("number", "how many", gt((5, "1000"), (3, "1,000"), (2, "100")), "1,000", 1.0, 1.0),
    # "3.5.": only the period not followed by a digit goes -> "3.5". Fewer than 3 matches:
    # 2 x "3.5", 8 x "4". held-out "3.5" (2): 1 match -> 1/3; held-out "4" (8): 2 -> 2/3
    # -> (2 * 1/3 + 8 * 2/3) / 10 = (18/3) / 10 = 0.6 (LAVIS too)
    5: ("number", "what number", gt((2, "3.5"), (8, "4")), "3.5.", 0.6, 0.6),
    # contraction: "Dont" -> "don't", and official also fixes the GT "dont" -> 3 x "don't", 7 x "no".
    # held-out "don't" (3): 2 matches -> 2/3; held-out "no" (7): 3 -> 1 -> (3 * 2/3 + 7) / 10 = 0.9
    # LAVIS keeps GT "dont": 2 x "don't" match. held-out "don't" (2): 1 -> 1/3; the other 8: 2 -> 2/3
    # -> (2/3 + 16/3) / 10 = 0.6
    6: ("other", "what is the", gt((2, "don't"), (1, "dont"), (7, "no")), "Dont", 0.9, 0.6),
    # articles: "a dog" -> "dog", GT "the dog" -> "dog": 1 match. held-out "dog" (1): 0 -> 0;
    # held-out "cat" (9): 1 match -> 1/3 -> (9 * 1/3) / 10 = 0.3. LAVIS: GT "the dog" kept -> 0 matches -> 0
    7: ("other", "what is the", gt((1, "the dog"), (9, "cat")), "a dog", 0.3, 0.0),
    # wrong answer: 0 matches everywhere -> 0
    8: ("other", "what color", gt((5, "red"), (5, "blue")), "green", 0.0, 0.0),
    # surrounding whitespace and "!": "  red!\t" -> "red!" -> "red " -> "red". 5 matches:
    # held-out "red" (5): 4 -> 1; held-out "blue" (5): 5 -> 1 -> 1.0 (LAVIS too)
    9: ("other", "what color", gt((5, "red"), (5, "blue")), "  red!\t", 1.0, 1.0),
    # unanimous GT holding an article, predicted verbatim: official compares raw strings -> 1.0;
    # LAVIS normalises only the prediction ("beach" != "the beach") -> 0
    10: ("other", "where", gt((10, "the beach")), "the beach", 1.0, 0.0),
}


def vqa_files(cases=CASES) -> tuple[list[dict], dict, dict]:
    annotations = {"annotations": [
        {"question_id": q, "image_id": 100 + q, "answer_type": at, "question_type": qt, "answers": answers,
         "multiple_choice_answer": answers[0]["answer"]}
        for q, (at, qt, answers, _, _, _) in cases.items()]}
    questions = {"questions": [{"question_id": q, "image_id": 100 + q, "question": "?"} for q in cases]}
    predictions = [{"question_id": q, "answer": case[3]} for q, case in cases.items()]
    return predictions, annotations, questions


@pytest.mark.parametrize("qid", list(CASES))
def test_per_question_accuracy(qid):
    _, _, answers, prediction, official, lavis = CASES[qid]
    assert vqa.question_accuracy(prediction, answers) == pytest.approx(official)
    assert vqa.question_accuracy(prediction, answers, legacy_lavis=True) == pytest.approx(lavis)


def test_normalisation():
    assert process_punctuation("1,000") == "1000"      # digit,digit: every punctuation mark is dropped
    assert process_punctuation("3.5") == "3.5"         # a period before a digit stays
    assert process_punctuation("yes.") == "yes"
    assert process_punctuation("a/b") == "a b"         # no space next to it: replaced by a space
    assert process_punctuation("hi, there") == "hi there"  # ", " present: dropped
    assert normalize_answer("Two Dogs\n") == "2 dogs"
    assert normalize_answer("The  dog ") == "dog"
    assert normalize_answer("dont") == "don't"
    assert normalize_answer("none") == "0"


def test_overall_and_per_type_official():
    result = score_vqa(*vqa_files())
    # sum of official accuracies: 1 + 0 + 1 + 1 + 0.6 + 0.9 + 0.3 + 0 + 1 + 1 = 6.8 over 10 questions
    assert result["accuracy"] == 68.0
    # yes/no: (1 + 0) / 2; number: (1 + 1 + 0.6) / 3 = 86.666..; other: (0.9 + 0.3 + 0 + 1 + 1) / 5 = 64
    assert result["per_answer_type"] == {"yes/no": 50.0, "number": 86.67, "other": 64.0}
    # what is the: (0.9 + 0.3) / 2; what color: (0 + 1) / 2; where: 1; what number: 0.6
    assert result["per_question_type"] == {"is the": 50.0, "how many": 100.0, "what number": 60.0,
                                           "what is the": 60.0, "what color": 50.0, "where": 100.0}
    assert result["num_questions"] == 10 and result["notes"] == []
    unrounded = score_vqa(*vqa_files(), ndigits=None)
    assert unrounded["per_answer_type"]["number"] == pytest.approx(260 / 3)


def test_legacy_lavis_differs_exactly_where_documented():
    result = score_vqa(*vqa_files(), legacy_lavis=True)
    # 1 + 1 + 0.9 + 1 + 0.6 + 0.6 + 0 + 0 + 1 + 0 = 6.1
    assert result["accuracy"] == 61.0
    # yes/no: (1 + 1) / 2; number: (0.9 + 1 + 0.6) / 3 = 83.33..; other: (0.6 + 0 + 0 + 1 + 0) / 5 = 32
    assert result["per_answer_type"] == {"yes/no": 100.0, "number": 83.33, "other": 32.0}
    # the smallest input on which they differ: unanimous "yes", prediction "Yes"
    single = {2: ("yes/no", "is the", gt((10, "yes")), "Yes", 0.0, 1.0)}
    assert score_vqa(*vqa_files(single))["accuracy"] == 0.0
    assert score_vqa(*vqa_files(single), legacy_lavis=True)["accuracy"] == 100.0


def test_unknown_and_missing_predictions():
    predictions, annotations, questions = vqa_files()
    with pytest.raises(Blip2Error, match="question id 999: not in the annotations"):
        score_vqa(predictions + [{"question_id": 999, "answer": "yes"}], annotations, questions)
    with pytest.raises(Blip2Error, match=r"id '1': not in the annotations \(the ground truth has it as int 1\)"):
        score_vqa([{"question_id": "1", "answer": "yes"}], annotations, questions)
    with pytest.raises(Blip2Error, match="no prediction for question id 3 .2 of 10"):
        score_vqa([p for p in predictions if p["question_id"] not in (3, 7)], annotations, questions)
    partial = score_vqa([p for p in predictions if p["question_id"] in (1, 5)], annotations, questions,
                        allow_missing=True)
    assert partial["accuracy"] == 80.0 and partial["num_questions"] == 2  # (1 + 0.6) / 2
    assert partial["notes"] == ["scored 2 of 10 questions: 8 have no prediction"]
    with pytest.raises(Blip2Error, match="predictions: item 0"):
        score_vqa([{"question_id": 1}], annotations, questions)
    with pytest.raises(Blip2Error, match="annotations: expected the official VQA annotations"):
        score_vqa(predictions, questions, questions)
    with pytest.raises(Blip2Error, match="question id 10 is not in the questions file"):
        score_vqa(predictions, annotations, {"questions": questions["questions"][:9]})


def test_repeated_prediction_keeps_the_last_as_the_official_api():
    predictions, annotations, questions = vqa_files()
    result = score_vqa([{"question_id": 2, "answer": "yes"}] + predictions, annotations, questions)
    assert result["accuracy"] == 68.0
    result = score_vqa(predictions + [{"question_id": 2, "answer": "yes"}], annotations, questions)
    assert result["accuracy"] == 78.0  # question 2 now scores 1
    assert result["notes"] == ["1 repeated question ids in the predictions: the last answer of each counts"]


GQA_QUESTIONS = {"201": {"answer": "yes", "question": "?"}, "202": {"answer": "two"},
                 "203": {"answer": "table"}, "204": {"answer": "right"}}
GQA_PREDICTIONS = [{"question_id": 201, "answer": "Yes."},      # "yes" == "yes"
                   {"question_id": "202", "answer": "2"},       # GT "two" -> "2"
                   {"question_id": 203, "answer": "the table"},  # article dropped
                   {"question_id": 204, "answer": "left"}]      # wrong


def test_gqa_exact_match_both_formats():
    assert score_gqa(GQA_PREDICTIONS, GQA_QUESTIONS) == {"accuracy": 75.0, "num_questions": 4, "notes": []}
    as_list = [{"question_id": int(k), **v} for k, v in GQA_QUESTIONS.items()]
    assert score_gqa(GQA_PREDICTIONS, as_list)["accuracy"] == 75.0
    with pytest.raises(Blip2Error, match="question id 999"):
        score_gqa(GQA_PREDICTIONS + [{"question_id": 999, "answer": "x"}], GQA_QUESTIONS)
    with pytest.raises(Blip2Error, match="no prediction for question id '204'"):
        score_gqa(GQA_PREDICTIONS[:3], GQA_QUESTIONS)
    with pytest.raises(Blip2Error, match="has no 'answer'"):
        score_gqa(GQA_PREDICTIONS, {"201": {"question": "?"}})


def test_lemmatize_without_spacy_is_a_one_line_error(monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "spacy", None)  # import spacy -> ImportError
    vqa._spacy_english.cache_clear()
    with pytest.raises(Blip2Error, match="pip install spacy") as info:
        vqa.lemmatize(["dogs running"])
    assert "\n" not in str(info.value)
    vqa._spacy_english.cache_clear()


# --- the CLI -------------------------------------------------------------------------------------------

@pytest.fixture
def vqa_paths(tmp_path):
    predictions, annotations, questions = vqa_files()
    paths = {}
    for name, data in (("predictions", predictions), ("annotations", annotations), ("questions", questions)):
        paths[name] = tmp_path / f"{name}.json"
        paths[name].write_text(json.dumps(data))
    return paths


def test_cli_json_is_one_object(vqa_paths):
    result = invoke("eval", "vqav2", "--predictions", str(vqa_paths["predictions"]), "--questions",
                    str(vqa_paths["questions"]), "--annotations", str(vqa_paths["annotations"]), "--json")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert len(lines) == 1
    assert json.loads(lines[0]) == score_vqa(*vqa_files())
    table = invoke("eval", "okvqa", "--predictions", str(vqa_paths["predictions"]), "--questions",
                   str(vqa_paths["questions"]), "--annotations", str(vqa_paths["annotations"]), "--legacy-lavis")
    assert table.exit_code == 0 and "61.00" in table.stderr and "yes/no" in table.stderr
    assert table.stdout == "" and "paper" not in table.stderr  # predictions: no paper row unless --paper


def test_cli_shows_the_papers_figure_beside_the_score(vqa_paths):
    """``--paper``: the recipe's figure for that model and ours minus it, in the table (stderr) and in --json."""
    from blip2cli.config import load_recipe
    from blip2cli.eval.generation import GenerationEval

    figures = load_recipe(GenerationEval, "eval/vqav2").paper
    paper = figures.models["blip2-flan-t5-xl"].figures["accuracy"]
    ours = score_vqa(*vqa_files())["accuracy"]
    args = ["eval", "vqav2", "--predictions", str(vqa_paths["predictions"]), "--questions",
            str(vqa_paths["questions"]), "--annotations", str(vqa_paths["annotations"]), "--paper", "blip2-flan-t5-xl"]
    table = invoke(*args)
    assert table.exit_code == 0, table.output
    assert table.stdout == ""
    rows = [line.split() for line in table.stderr.splitlines()]
    assert ["accuracy", "(%)", "paper", "Δ"] in rows
    assert ["overall", f"{ours:.2f}", f"{paper:.2f}", f"{ours - paper:+.2f}"] in rows
    note = f" ({figures.note})" if figures.note else ""
    caption = f"paper: {figures.table}, {figures.models['blip2-flan-t5-xl'].row}, {figures.split}{note}"
    assert caption in table.stderr.splitlines()

    result = invoke(*args, "--json")
    assert result.exit_code == 0, result.output
    shown = json.loads(result.stdout)
    assert shown.pop("paper") == {"table": figures.table, "split": figures.split, "model": "blip2-flan-t5-xl",
                                  "row": figures.models["blip2-flan-t5-xl"].row,
                                  **({"note": figures.note} if figures.note else {}),
                                  "figures": {"accuracy": paper},
                                  "difference": {"accuracy": pytest.approx(ours - paper, abs=1e-6)}}
    assert shown == score_vqa(*vqa_files())  # every other key as without --paper


def test_cli_unknown_paper_model_is_a_one_line_error(vqa_paths):
    proc = blip2("eval", "gqa", "--predictions", vqa_paths["predictions"], "--questions", vqa_paths["questions"],
                 "--paper", "blip2-opt-2.7b-coco")
    assert_one_line_error(proc, "--paper blip2-opt-2.7b-coco: the paper has no gqa figures for it; choose ",
                          "blip2-flan-t5-xl")


def test_cli_gqa_and_json_lines(tmp_path):
    (tmp_path / "q.json").write_text(json.dumps(GQA_QUESTIONS))
    (tmp_path / "p.jsonl").write_text("\n".join(json.dumps(p) for p in GQA_PREDICTIONS) + "\n")
    result = invoke("eval", "gqa", "--predictions", str(tmp_path / "p.jsonl"), "--questions", str(tmp_path / "q.json"),
                    "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["accuracy"] == 75.0


REQUIRED = {"vqav2": ["--questions", "q.json", "--annotations", "a.json"],
            "okvqa": ["--questions", "q.json", "--annotations", "a.json"], "gqa": ["--questions", "q.json"],
            "coco": ["--annotations", "a.json"], "nocaps": ["--annotations", "a.json"]}


@pytest.mark.parametrize("command", list(REQUIRED))
def test_cli_needs_predictions_or_a_model(command):
    result = invoke("eval", command, *REQUIRED[command])
    assert isinstance(result.exception, Blip2Error)
    assert "give --model (with --images) to run a model, or --predictions FILE" in str(result.exception)
    result = invoke("eval", command, *REQUIRED[command], "--model", "blip2-opt-2.7b")
    assert "--model needs --images" in str(result.exception)


def test_cli_bad_inputs_name_the_file_or_id(vqa_paths, tmp_path):
    args = ["--questions", str(vqa_paths["questions"]), "--annotations", str(vqa_paths["annotations"])]
    missing = invoke("eval", "vqav2", "--predictions", str(tmp_path / "nope.json"), *args)
    assert isinstance(missing.exception, Blip2Error)
    assert str(missing.exception) == f"{tmp_path / 'nope.json'}: no such file"
    (tmp_path / "bad.json").write_text('[{"question_id": 1, "answer": "yes"},')
    bad = invoke("eval", "vqav2", "--predictions", str(tmp_path / "bad.json"), *args)
    assert isinstance(bad.exception, Blip2Error)
    assert str(bad.exception).startswith(f"{tmp_path / 'bad.json'}: not valid JSON")
    (tmp_path / "unknown.json").write_text(json.dumps([{"question_id": 12345, "answer": "yes"}]))
    unknown = invoke("eval", "vqav2", "--predictions", str(tmp_path / "unknown.json"), *args)
    assert isinstance(unknown.exception, Blip2Error) and "question id 12345" in str(unknown.exception)
    swapped = invoke("eval", "vqav2", "--predictions", str(vqa_paths["predictions"]), "--questions",
                     str(vqa_paths["annotations"]), "--annotations", str(vqa_paths["questions"]))
    assert str(swapped.exception).startswith(f"{vqa_paths['questions']}: expected the official VQA annotations")
    no_questions = invoke("eval", "vqav2", "--predictions", str(vqa_paths["predictions"]))
    assert str(no_questions.exception) == "eval vqav2: --questions FILE is required"
    assert all("\n" not in str(r.exception) for r in (missing, bad, unknown, swapped, no_questions))
