"""Zero-shot VQA evaluation speed: transformers answering one question at a time against ``blip2 eval``'s path.

40 questions over 8 images (5 per image, asked round-robin over the images, so that an image's questions are
not adjacent) on generate.py's random mid-size BLIP-2, with the paper's VQA decoding: 5 beams, 1 to 10 new
tokens, length penalty 0 for OPT, prompt "Question: {} Short answer:". The reference is transformers'
Blip2ForConditionalGeneration with a batch of one; blip2 runs ``blip2 eval``'s prediction (image files read per
batch, predictions written and merged) with its batch size, beams ranked as transformers 5.x ranks them. The
sides run alternately over ``--rounds`` rounds, each run in a fresh process; each run first answers one batch
of its own size untimed. Prints each side's best round in questions/s with the spread across rounds, the ratio
of the best rounds and peak memory (the largest over rounds), and checks that every round of both sides gives
the same answer to every question (exit 1 otherwise, the differing answers on stderr).

    python -m benchmarks.vqa_eval [--device cuda --dtype bfloat16] [--full] [--rounds 3] [--batch 16]

``--full`` uses the blip2-opt-2.7b architecture (for a GPU).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

from benchmarks._memory import peak_rss_mib
from benchmarks._rounds import add_rounds_argument, alternate, spawned
from benchmarks.generate import add_model_arguments, build_checkpoint, load_reference, reference_generate

IMAGES = 8
QUESTIONS = ["what is in the picture?", "what colour is the shape?", "what colour is the background?",
             "how many objects are there?", "is it a circle?"]
PROMPT = "Question: {} Short answer:"
DECODING = {"num_beams": 5, "max_new_tokens": 10, "min_new_tokens": 1, "length_penalty": 0.0}


def questions() -> list[tuple[int, int, str]]:
    """(question id, image index, question) for every question, round-robin over the images."""
    return [(q, q % IMAGES, QUESTIONS[q // IMAGES]) for q in range(IMAGES * len(QUESTIONS))]


def write_images(directory: Path) -> list[Path]:
    """The benchmark's images as PNG files in ``directory``."""
    from tests.tiny import draw_image

    paths = [directory / f"image{i}.png" for i in range(IMAGES)]
    for i, path in enumerate(paths):
        draw_image(i, size=224).save(path)
    return paths


def run_side(side: str, path: str, images: list[str], device: str, dtype: str, batch: int, queue) -> None:
    """One round of one side: one batch of its own size untimed (the first question, or the first ``batch``), then
    all the questions timed."""
    import torch

    import blip2cli
    from blip2cli.eval.generation import GenerationEval, predict
    from blip2cli.eval.runner import Item

    blip = blip2cli.load(path, device=device, dtype=dtype)  # tokenizer and transform, shared by both sides
    asked = questions()
    out_root = Path(tempfile.mkdtemp())
    if side == "transformers":
        ref = load_reference(path, blip)

        def answer(subset: list[tuple[int, int, str]]) -> dict[int, str]:
            return {qid: reference_generate(ref, blip, [Path(images[image])], [PROMPT.format(question)],
                                            **DECODING)[0] for qid, image, question in subset}
    else:
        settings = GenerationEval(batch_size=batch, generation="vqa")
        settings.decoding = settings.decoding.with_overrides(beam_scoring="transformers")

        def answer(subset: list[tuple[int, int, str]]) -> dict[int, str]:
            items = [Item(id=qid, image=Path(images[image]), text=question) for qid, image, question in subset]
            out = Path(tempfile.mkdtemp(dir=out_root))  # a fresh directory: nothing to resume from
            written = predict(blip, items, settings, out, "question_id", "answer", show_progress=False)
            return {p["question_id"]: p["answer"] for p in json.loads(written.read_text())}

    answer(asked[:1 if side == "transformers" else batch])  # warm-up: one batch of the side's own size
    sync = torch.cuda.synchronize if blip.device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    answers = answer(asked)
    sync()
    elapsed = time.perf_counter() - start
    shutil.rmtree(out_root)
    peak_gpu = torch.cuda.max_memory_allocated() / 2**20 if blip.device.type == "cuda" else None
    queue.put({"questions_per_s": len(asked) / elapsed, "answers": answers, "peak_rss_mib": peak_rss_mib(),
               "peak_gpu_mib": peak_gpu})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--batch", type=int, default=16, help="blip2's evaluation batch size")
    add_rounds_argument(parser)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model"
        build_checkpoint(path, args.full)
        (Path(tmp) / "images").mkdir()
        images = [str(p) for p in write_images(Path(tmp) / "images")]
        rounds = alternate({side: spawned(run_side, side, str(path), images, args.device, args.dtype, args.batch)
                            for side in ("transformers", "blip2")}, args.rounds)
    differing = rounds.differing("answers")
    report = {
        "config": "blip2-opt-2.7b" if args.full else "mid (ViT 12x768, Q-Former BERT-base, OPT-125M)",
        "device": args.device, "dtype": args.dtype, "questions": len(questions()), "images": IMAGES,
        "transformers_batch": 1, "blip2_batch": args.batch, **DECODING, "rounds": args.rounds,
        **rounds.timing("questions_per_s"),
        "speed_ratio_of_best_rounds": round(rounds.ratio("blip2", "transformers", "questions_per_s"), 3),
        **rounds.peaks("peak_rss_mib"), **rounds.peaks("peak_gpu_mib"),
        "answers_identical": not differing,
    }
    print(json.dumps(report, indent=2))
    if differing:
        expected = rounds.runs["transformers"][0]["answers"]
        for side, r in differing:
            got = rounds.runs[side][r]["answers"]
            for qid in sorted(set(expected) | set(got)):
                if expected.get(qid) != got.get(qid):
                    print(f"question {qid} ({side}, round {r + 1}): {expected.get(qid)!r} vs {got.get(qid)!r}",
                          file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
