"""VQA accuracy exactly as the official VQA evaluation code computes it; GQA exact match; OK-VQA lemmatiser.

The reference is ``PythonEvaluationTools/vqaEvaluation/vqaEval.py`` of GT-Vision-Lab/VQA at its current
commit (a013f00, March 2021, "Fixed processing answers bug"). For each question and its ten ground-truth
(GT) answers:

1. in the prediction and in every GT answer, newlines and tabs become spaces and the ends are stripped;
2. only when the GT answers (after step 1) are not all identical, every GT answer and the prediction go
   through ``process_punctuation`` then ``process_digit_article``. When the annotators agree, neither side
   is touched further and the prediction must match the GT string exactly (intended: the authors did not
   want answers such as OCR text normalised, GT-Vision-Lab/VQA#14);
3. accuracy = mean over the ten GT answers of min(1, number of the *other* nine equal to the prediction / 3).

Overall, per answer type and per question type: 100 x the mean, rounded to 2 decimals.

How LAVIS differs (``lavis/common/vqa_tools/vqa_eval.py`` copies the pre-2021 version):

- the prediction is *always* whitespace-cleaned, punctuation-processed and digit/article-processed,
  whatever the GT answers are;
- GT answers are never whitespace-cleaned; when they are not all identical they go through
  ``process_punctuation`` only (no lowercasing, no number words to digits, no article removal, no
  contractions); when they are identical they stay raw, as in the official code.

So the two give different numbers on exactly these inputs:

- unanimous GT and a prediction that equals it only after normalisation: GT 10 x "yes" and prediction
  "Yes" or "yes." (official 0, LAVIS 100); GT 10 x "2" and prediction "two" (official 0, LAVIS 100).
  Conversely, unanimous GT that normalisation would change, e.g. 10 x "the beach", predicted verbatim
  (official 100, LAVIS 0: LAVIS compares "beach" with "the beach");
- split GT whose answers differ only in case, number words, articles or contractions, e.g. 4 x "two",
  3 x "2", 3 x "3" with prediction "2": official 100 (all seven become "2"), LAVIS 90 (only the three
  literal "2" match);
- GT answers with surrounding whitespace, tabs or newlines (the official code strips them; this can
  also turn a split GT into a unanimous one).

``legacy_lavis=True`` reproduces LAVIS's copy. GQA (``score_gqa``) follows LAVIS's ``GQATask``: exact
match after ``process_punctuation`` and ``process_digit_article`` on both prediction and GT.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Hashable, Iterable, Mapping, Sequence
from typing import Any

from ..runtime.errors import Blip2Error

# The official lists and maps (data, not code).
PUNCTUATION = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-",
               ">", "<", "@", "`", ",", "?", "!"]
ARTICLES = {"a", "an", "the"}
NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's",
    "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll",
    "let's": "let's", "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't", "mustve": "must've",
    "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at",
    "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've",
    "she'dve": "she'd've", "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've", "somebodyll": "somebody'll",
    "somebodys": "somebody's", "someoned": "someone'd", "someoned've": "someone'd've",
    "someone'dve": "someone'd've", "someonell": "someone'll", "someones": "someone's",
    "somethingd": "something'd", "somethingd've": "something'd've", "something'dve": "something'd've",
    "somethingll": "something'll", "thats": "that's", "thered": "there'd", "thered've": "there'd've",
    "there'dve": "there'd've", "therere": "there're", "theres": "there's", "theyd": "they'd",
    "theyd've": "they'd've", "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're",
    "theyve": "they've", "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've",
    "weve": "we've", "werent": "weren't", "whatll": "what'll", "whatre": "what're", "whats": "what's",
    "whatve": "what've", "whens": "when's", "whered": "where'd", "wheres": "where's", "whereve": "where've",
    "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've", "wholl": "who'll", "whos": "who's",
    "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's", "wont": "won't",
    "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've",
    "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll", "yall'd've": "y'all'd've",
    "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd", "youd've": "you'd've",
    "you'dve": "you'd've", "youll": "you'll", "youre": "you're", "youve": "you've",
}
# The official pattern reads "(?!<=\d)": a typo for a look-behind that is in fact a look-ahead for the
# text "<=" + digit, so it removes every period not followed by a digit ("5." -> "5", "3.5" stays).
_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")
_DIGIT_COMMA_DIGIT = re.compile(r"(\d)(,)(\d)")
# The official call passes re.UNICODE (32) positionally as the count: at most 32 periods go.
_PERIOD_COUNT = int(re.UNICODE)


def process_punctuation(text: str) -> str:
    """The official ``processPunctuation``: drop or space out punctuation, drop periods not before a digit."""
    out = text
    drop_all = _DIGIT_COMMA_DIGIT.search(text) is not None
    for p in PUNCTUATION:
        # Conditions look at the input text, not at the partly processed one (as the official code).
        if drop_all or p + " " in text or " " + p in text:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD.sub("", out, count=_PERIOD_COUNT)


def process_digit_article(text: str) -> str:
    """The official ``processDigitArticle``: lowercase, number words to digits, no articles, contractions."""
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    return " ".join(CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES)


def clean_whitespace(text: str) -> str:
    return text.replace("\n", " ").replace("\t", " ").strip()


def normalize_answer(text: str) -> str:
    """Whitespace, punctuation, then digits/articles/contractions (official: only when the GT answers disagree)."""
    return process_digit_article(process_punctuation(clean_whitespace(text)))


def question_accuracy(prediction: str, answers: Sequence[str | Mapping[str, Any]], *,
                      legacy_lavis: bool = False) -> float:
    """Accuracy in [0, 1] of one prediction against the GT answers (strings or annotation answer records)."""
    records = [dict(a) if isinstance(a, Mapping) else {"answer": a, "answer_id": i} for i, a in enumerate(answers)]
    if not records:
        raise Blip2Error("a question has no ground-truth answers")
    if legacy_lavis:
        pred = normalize_answer(prediction)
        if len({r["answer"] for r in records}) > 1:
            for r in records:
                r["answer"] = process_punctuation(r["answer"])
    else:
        pred = clean_whitespace(prediction)
        for r in records:
            r["answer"] = clean_whitespace(r["answer"])
        if len({r["answer"] for r in records}) > 1:
            for r in records:
                r["answer"] = process_digit_article(process_punctuation(r["answer"]))
            pred = process_digit_article(process_punctuation(pred))
    matches = [r for r in records if r["answer"] == pred]
    # Leave-one-out as the official code does it: it drops every record *equal* to the held-out one. With
    # the released annotations (distinct answer_id) that is exactly one record.
    per_subset = [min(1, sum(1 for m in matches if m != held_out) / 3) for held_out in records]
    return sum(per_subset) / len(per_subset)


def _percent(values: list[float], ndigits: int | None) -> float:
    value = 100 * float(sum(values)) / len(values)  # the official order of operations
    return value if ndigits is None else round(value, ndigits)


def _id_hint(qid: Any, known: Iterable[Hashable]) -> str:
    """Explain a near miss such as "123" (string) against 123 (int)."""
    for k in known:
        if str(k) == str(qid):
            return f" (the ground truth has it as {type(k).__name__} {k!r})"
    return ""


def _predicted_answers(predictions: Any, known: Mapping[Hashable, Any], kind: str,
                       key=lambda qid: qid) -> tuple[dict[Hashable, str], list[str]]:
    """question id -> predicted answer; unknown ids are errors, a repeated id keeps its last answer."""
    if not isinstance(predictions, list):
        raise Blip2Error('predictions: expected a JSON list of {"question_id", "answer"} objects')
    answers: dict[Hashable, str] = {}
    unknown: list[Any] = []
    repeated = 0
    for n, p in enumerate(predictions):
        if not isinstance(p, dict) or not isinstance(p.get("answer"), str) \
                or not isinstance(p.get("question_id"), (int, str)):
            raise Blip2Error(f"predictions: item {n} is not an object with a 'question_id' and a string 'answer'")
        qid = key(p["question_id"])
        if qid not in known:
            unknown.append(p["question_id"])
            continue
        repeated += qid in answers
        answers[qid] = p["answer"]
    if unknown:
        raise Blip2Error(f"prediction for question id {unknown[0]!r}: not in the {kind}{_id_hint(unknown[0], known)} "
                         f"({len(unknown)} of {len(predictions)} predictions have unknown ids)")
    notes = [f"{repeated} repeated question ids in the predictions: the last answer of each counts"] if repeated else []
    return answers, notes


def _check_missing(known: Mapping[Hashable, Any], answers: Mapping[Hashable, str], allow_missing: bool,
                   notes: list[str]) -> list[Hashable]:
    missing = [q for q in known if q not in answers]
    if missing and not allow_missing:
        raise Blip2Error(f"no prediction for question id {missing[0]!r} ({len(missing)} of {len(known)} questions "
                         "have none; the official evaluation needs all: --allow-missing scores the predicted ones)")
    if not answers:
        raise Blip2Error("predictions: none to score")
    if missing:
        notes.append(f"scored {len(answers)} of {len(known)} questions: {len(missing)} have no prediction")
    return [q for q in known if q in answers]


def vqa_annotations(annotations: Any, questions: Any) -> dict[Hashable, dict]:
    """question id -> annotation record, checked against the questions file (official v2 JSON formats)."""
    if not isinstance(annotations, dict) or not isinstance(annotations.get("annotations"), list):
        raise Blip2Error("annotations: expected the official VQA annotations JSON "
                         "(an object with an 'annotations' list)")
    if not isinstance(questions, dict) or not isinstance(questions.get("questions"), list):
        raise Blip2Error("questions: expected the official VQA questions JSON (an object with a 'questions' list)")
    by_id: dict[Hashable, dict] = {}
    for n, a in enumerate(annotations["annotations"]):
        if not isinstance(a, dict) or not isinstance(a.get("question_id"), (int, str)) \
                or not isinstance(a.get("answers"), list) or not a["answers"] \
                or not all(isinstance(x, dict) and isinstance(x.get("answer"), str) for x in a["answers"]):
            raise Blip2Error(f"annotations: item {n} lacks a 'question_id' or a non-empty 'answers' list of "
                             "{'answer': str} records")
        by_id[a["question_id"]] = a
    asked = {q.get("question_id") for q in questions["questions"] if isinstance(q, dict)}
    for qid in by_id:
        if qid not in asked:
            raise Blip2Error(f"annotations: question id {qid!r} is not in the questions file "
                             "(files of different splits?)")
    return by_id


def score_vqa(predictions: list[dict], annotations: dict, questions: dict, *, allow_missing: bool = False,
              legacy_lavis: bool = False, ndigits: int | None = 2) -> dict:
    """VQA accuracy (official algorithm) overall, per answer type and per question type, in percent.

    ``predictions``: ``[{"question_id", "answer"}]``; ``annotations``/``questions``: the official JSON files.
    Every annotated question needs a prediction unless ``allow_missing``.
    """
    gt = vqa_annotations(annotations, questions)
    answers, notes = _predicted_answers(predictions, gt, "annotations")
    scored = _check_missing(gt, answers, allow_missing, notes)
    overall: list[float] = []
    by_answer_type: dict[str, list[float]] = {}
    by_question_type: dict[str, list[float]] = {}
    for qid in scored:
        ann = gt[qid]
        acc = question_accuracy(answers[qid], ann["answers"], legacy_lavis=legacy_lavis)
        overall.append(acc)
        if "answer_type" in ann:
            by_answer_type.setdefault(ann["answer_type"], []).append(acc)
        if "question_type" in ann:
            by_question_type.setdefault(ann["question_type"], []).append(acc)
    return {
        "accuracy": _percent(overall, ndigits),
        "per_answer_type": {t: _percent(v, ndigits) for t, v in by_answer_type.items()},
        "per_question_type": {t: _percent(v, ndigits) for t, v in by_question_type.items()},
        "num_questions": len(scored),
        "notes": notes,
    }


def gqa_answers(questions: Any) -> dict[str, str]:
    """question id (as a string) -> GT answer, from GQA's dict format or LAVIS's list format."""
    if isinstance(questions, dict):
        items = list(questions.items())
    elif isinstance(questions, list):
        items = [(q.get("question_id") if isinstance(q, dict) else None, q) for q in questions]
    else:
        raise Blip2Error("questions: expected GQA questions (an object id -> {'answer': ...}) or a list of "
                         "{'question_id', 'answer'} objects")
    answers: dict[str, str] = {}
    for qid, q in items:
        if not isinstance(qid, (int, str)) or not isinstance(q, dict):
            raise Blip2Error(f"questions: entry {qid!r} is not a question object with an id")
        if not isinstance(q.get("answer"), str):
            raise Blip2Error(f"questions: question {qid!r} has no 'answer' (a test split without answers?)")
        answers[str(qid)] = q["answer"]
    return answers


def score_gqa(predictions: list[dict], questions: Any, *, allow_missing: bool = False,
              ndigits: int | None = 2) -> dict:
    """GQA accuracy in percent: exact match after punctuation and digit/article processing of both sides.

    GQA ids are strings; prediction ids are compared as strings, so 20968345 and "20968345" are the same.
    """
    gt = gqa_answers(questions)
    answers, notes = _predicted_answers(predictions, gt, "questions", key=str)
    scored = _check_missing(gt, answers, allow_missing, notes)
    hits = [float(process_digit_article(process_punctuation(answers[q]))
                  == process_digit_article(process_punctuation(gt[q]))) for q in scored]
    return {"accuracy": _percent(hits, ndigits), "num_questions": len(scored), "notes": notes}


@functools.lru_cache(maxsize=1)
def _spacy_english():
    try:
        import spacy

        return spacy.load("en_core_web_sm")
    except (ImportError, OSError):
        raise Blip2Error("the OK-VQA lemmatiser needs spaCy and its English model: "
                         "pip install spacy && python -m spacy download en_core_web_sm") from None


def lemmatize(answers: list[str]) -> list[str]:
    """LAVIS's OK-VQA lemmatiser: nouns and verbs become their spaCy ``en_core_web_sm`` lemmas."""
    nlp = _spacy_english()
    return [" ".join(t.lemma_ if t.pos_ in ("NOUN", "VERB") else t.text for t in nlp(a)) for a in answers]
