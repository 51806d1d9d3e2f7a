"""``blip2 generate`` as users type it, and the Python API it shares its rules with."""

from __future__ import annotations

import shutil

import pytest
import torch
from PIL import Image

import blip2cli
from blip2cli.api import Decoding
from blip2cli.runtime.errors import EXIT_BAD_INPUT, EXIT_OK, EXIT_PARTIAL, Blip2Error

from tests.helpers import FAST, assert_one_line_error, blip2, error_lines, records

VQA = "Question: what is in the picture? Short answer:"


@pytest.fixture
def mixed_folder(image_files, tmp_path):
    """3 readable images and 2 unreadable ones, sorted so that a truncated file shares a batch of 2."""
    folder = tmp_path / "mixed"
    folder.mkdir()
    for name, source in (("a0.png", 0), ("a2.png", 1), ("a4.png", 2)):
        shutil.copy(image_files[source], folder / name)
    (folder / "a1_cut.png").write_bytes(image_files[3].read_bytes()[:60])
    (folder / "a3_notes.jpg").write_text("not a picture")
    return folder


# ---------------------------------------------------------------- prompts as typed


def test_vqa_prompt_on_a_batch_equals_the_api(hf_opt, image_files, opt, tmp_path):
    images = [str(p) for p in image_files[:3]]
    proc = blip2("generate", *images, VQA, "--model", str(hf_opt), "--json", "--num-beams", "2", "--batch-size", "2",
                 *FAST, cwd=tmp_path)
    assert proc.returncode == EXIT_OK, proc.stderr
    got = records(proc)
    assert [r["image"] for r in got] == images
    assert all(r["prompt"] == VQA for r in got)
    assert [r["text"] for r in got] == opt.generate(images, VQA, num_beams=2, max_new_tokens=4)


def test_glob_characters_in_a_prompt(hf_opt, image_files, tmp_path):
    prompt = "Question: what [shape] is * here? Short answer:"
    proc = blip2("generate", str(image_files[0]), prompt, "--model", str(hf_opt), "--json", "--num-beams", "1", *FAST,
                 cwd=tmp_path)
    assert proc.returncode == EXIT_OK, proc.stderr
    assert [r["prompt"] for r in records(proc)] == [prompt]


def test_split_arguments_by_what_exists(image_files, tmp_path, monkeypatch):
    from blip2cli.cli.generate import split_arguments

    monkeypatch.chdir(tmp_path)
    image, folder = str(image_files[0]), str(image_files[0].parent)
    assert split_arguments([image, "what is it?"]) == ([image], "what is it?")
    assert split_arguments([image, "a [b] * c"]) == ([image], "a [b] * c")
    assert split_arguments([image, folder]) == ([image, folder], None)
    assert split_arguments([image, f"{folder}/img[01].png"]) == ([image, f"{folder}/img[01].png"], None)
    assert split_arguments([image, "typo.jpg"]) == ([image, "typo.jpg"], None)
    assert split_arguments(["what is it?"]) == (["what is it?"], None)


def test_missing_image_named_last_is_not_a_prompt(hf_opt, image_files, tmp_path):
    proc = blip2("generate", str(image_files[0]), "typo.jpg", "--model", str(hf_opt), cwd=tmp_path)
    assert_one_line_error(proc, "typo.jpg: no such file")


def test_prompt_option_makes_every_argument_an_image(hf_opt, image_files, opt, tmp_path):
    images = [str(p) for p in image_files[:2]]
    proc = blip2("generate", *images, "--prompt", "a photo of", "--model", str(hf_opt), "--json", "--num-beams", "2",
                 *FAST, cwd=tmp_path)
    assert proc.returncode == EXIT_OK, proc.stderr
    got = records(proc)
    assert [(r["image"], r["prompt"]) for r in got] == [(im, "a photo of") for im in images]
    assert [r["text"] for r in got] == opt.generate(images, "a photo of", num_beams=2, max_new_tokens=4)


def test_prompt_file_gives_one_prompt_per_image(hf_opt, image_files, opt, tmp_path):
    images = [str(p) for p in image_files[:3]]
    prompts = ["a photo of", VQA, ""]
    prompt_file = tmp_path / "prompts.txt"
    prompt_file.write_text("\n".join(prompts) + "\n", encoding="utf-8")
    proc = blip2("generate", *images, "--prompt-file", str(prompt_file), "--model", str(hf_opt), "--json",
                 "--num-beams", "2", *FAST, cwd=tmp_path)
    assert proc.returncode == EXIT_OK, proc.stderr
    got = records(proc)
    assert [(r["image"], r["prompt"]) for r in got] == list(zip(images, prompts))
    assert [r["text"] for r in got] == opt.generate(images, prompts, num_beams=2, max_new_tokens=4)


def test_prompt_options_conflicts_and_counts_are_one_line_errors(hf_opt, image_files, tmp_path):
    image = str(image_files[0])
    prompt_file = tmp_path / "prompts.txt"
    prompt_file.write_text("one\ntwo\n")
    assert_one_line_error(blip2("generate", image, "--prompt-file", str(prompt_file), "--model", str(hf_opt)),
                          "prompts.txt", "2 prompts for 1 image")
    assert_one_line_error(blip2("generate", image, "--prompt", "a", "--prompt-file", str(prompt_file)),
                          "--prompt or --prompt-file, not both")
    assert_one_line_error(blip2("generate", image, "what is it?", "--prompt", "a", cwd=tmp_path),
                          "two prompts", "'what is it?'", "--prompt")
    assert_one_line_error(blip2("generate", image, "--prompt-file", str(tmp_path / "none.txt")),
                          "none.txt: no such file")


def test_read_prompt_file_lines(tmp_path):
    from blip2cli.cli.generate import read_prompt_file

    path = tmp_path / "p.txt"
    path.write_bytes(b"first? [a]\r\n\nthird *\n")
    assert read_prompt_file(str(path)) == ["first? [a]", "", "third *"]
    path.write_text("no final newline")
    assert read_prompt_file(str(path)) == ["no final newline"]


# ---------------------------------------------------------------- unreadable images


def test_bad_files_in_a_folder_are_skipped_and_named(hf_opt, mixed_folder, opt):
    proc = blip2("generate", str(mixed_folder), "--model", str(hf_opt), "--json", "--num-beams", "2",
                 "--batch-size", "2", *FAST)
    assert proc.returncode == EXIT_PARTIAL, proc.stderr
    good = [str(mixed_folder / name) for name in ("a0.png", "a2.png", "a4.png")]
    got = records(proc)
    assert [r["image"] for r in got] == good
    assert [r["text"] for r in got] == opt.generate(good, num_beams=2, max_new_tokens=4)
    lines = error_lines(proc)
    assert len(lines) == 2, proc.stderr
    assert any(line.startswith(f"error: {mixed_folder / 'a1_cut.png'}: corrupt or truncated") for line in lines)
    assert any(line.startswith(f"error: {mixed_folder / 'a3_notes.jpg'}: not an image") for line in lines)


def test_single_unreadable_images_are_one_line_and_exit_2(hf_opt, mixed_folder):
    assert_one_line_error(blip2("generate", str(mixed_folder / "a1_cut.png"), "--model", str(hf_opt)),
                          "a1_cut.png: corrupt or truncated image")
    assert_one_line_error(blip2("generate", str(mixed_folder / "a3_notes.jpg"), "--model", str(hf_opt)),
                          "a3_notes.jpg: not an image file")


def test_nothing_readable_exits_2_with_one_line_per_file(hf_opt, mixed_folder):
    proc = blip2("generate", str(mixed_folder / "a1_cut.png"), str(mixed_folder / "a3_notes.jpg"),
                 "--model", str(hf_opt), *FAST)
    assert proc.returncode == EXIT_BAD_INPUT
    assert proc.stdout == ""
    assert len(error_lines(proc)) == 2


def test_header_check_does_not_decode(mixed_folder):
    from blip2cli.images import check_header, open_rgb

    check_header(mixed_folder / "a1_cut.png")  # a readable header: decoding happens later, once
    with pytest.raises(Blip2Error, match="a1_cut.png: corrupt or truncated image"):
        open_rgb(mixed_folder / "a1_cut.png")
    with pytest.raises(Blip2Error, match="a3_notes.jpg: not an image file"):
        check_header(mixed_folder / "a3_notes.jpg")


def test_api_skips_unreadable_images_when_asked(mixed_folder, opt):
    images = [mixed_folder / "a0.png", mixed_folder / "a1_cut.png", mixed_folder / "a2.png"]
    seen: list = []
    out = opt.generate(images, batch_size=3, on_error=lambda image, error: seen.append((image, str(error))),
                       num_beams=1, max_new_tokens=4)
    assert out[1] is None and [out[0], out[2]] == opt.generate([images[0], images[2]], num_beams=1, max_new_tokens=4)
    assert [image for image, _ in seen] == [images[1]] and "corrupt or truncated" in seen[0][1]
    with pytest.raises(Blip2Error, match="a1_cut.png"):
        opt.generate(images, num_beams=1, max_new_tokens=4)


# ---------------------------------------------------------------- decoding rules shared by CLI and API


def test_sampling_without_beams_means_one_beam():
    assert Decoding(num_beams=5).with_overrides(sample=True).num_beams == 1
    assert Decoding(num_beams=5).with_overrides(sample=True, num_beams=3).num_beams == 3
    assert Decoding(num_beams=5).with_overrides(sample=None, num_beams=None, max_new_tokens=7) == \
        Decoding(num_beams=5, max_new_tokens=7)
    with pytest.raises(Blip2Error, match="num_beam"):
        Decoding().with_overrides(num_beam=3)


def test_cli_and_api_sample_alike(hf_opt, image_files, opt, tmp_path):
    """Nucleus mass 0 keeps only the likeliest token: sampling with one beam is then greedy search,
    while beam-sampling the recipe's 5 beams is not."""
    images = [str(p) for p in image_files[:3]]
    assert opt.decoding(sample=True) == opt.decoding(num_beams=1, sample=True)
    api = opt.generate(images, sample=True, top_p=0.0, max_new_tokens=4)
    assert api == opt.generate(images, num_beams=1, max_new_tokens=4)
    proc = blip2("generate", *images, "--model", str(hf_opt), "--json", "--sample", "--top-p", "0", *FAST, cwd=tmp_path)
    assert proc.returncode == EXIT_OK, proc.stderr
    assert [r["text"] for r in records(proc)] == api


# ---------------------------------------------------------------- single items in the API


def test_single_image_returns_one_text(image_files, opt):
    kw = dict(num_beams=2, max_new_tokens=4)
    expected = opt.generate([image_files[0]], "a photo of", **kw)[0]
    assert isinstance(expected, str)
    assert opt.generate(str(image_files[0]), "a photo of", **kw) == expected
    assert opt.generate(image_files[0], "a photo of", **kw) == expected
    with Image.open(image_files[0]) as im:
        assert opt.generate(im, "a photo of", **kw) == expected
    several = opt.generate(image_files[0], num_captions=2, **kw)
    assert isinstance(several, list) and len(several) == 2 and all(isinstance(t, str) for t in several)


def test_one_prompt_for_a_list_of_images(image_files, opt):
    images = image_files[:3]
    out = opt.generate(images, VQA, num_beams=1, max_new_tokens=4)
    assert isinstance(out, list) and len(out) == 3
    assert out == opt.generate(images, [VQA] * 3, num_beams=1, max_new_tokens=4)
    with pytest.raises(Blip2Error, match="2 prompts for 3 images"):
        opt.generate(images, ["a", "b"])


def test_itm_itc_and_features_take_single_items(hf_itm, image_files):
    blip = blip2cli.load(str(hf_itm), device="cpu", dtype="float32")
    images = image_files[:2]
    texts = ["a photo of a red circle on a table", "two dogs are playing in the park"]
    probs = blip.itm(images, texts)
    assert isinstance(blip.itm(images[0], texts[0]), float)
    assert blip.itm(str(images[0]), texts[0]) == pytest.approx(probs[0].item(), abs=1e-6)
    torch.testing.assert_close(blip.itm(images, texts[0]), blip.itm(images, [texts[0]] * 2))
    torch.testing.assert_close(blip.itm(images[0], texts), blip.itm([images[0]] * 2, texts))
    sims = blip.itc(images, texts)
    torch.testing.assert_close(blip.itc(images[0], texts), sims[0])
    torch.testing.assert_close(blip.itc(images, texts[1]), sims[:, 1])
    assert blip.itc(images[1], texts[0]) == pytest.approx(sims[1, 0].item(), abs=1e-6)
    feats = blip.extract_features(images, mode="image")
    one = blip.extract_features(images[1], mode="image")
    assert one.keys() == feats.keys()
    for key in feats:
        torch.testing.assert_close(one[key], feats[key][1], atol=1e-5, rtol=0)
    text = blip.extract_features(texts=texts[0], mode="text")
    assert text["text_features"].shape == blip.extract_features(texts=texts, mode="text")["text_features"].shape[1:]


# ---------------------------------------------------------------- help


def test_help_explains_options_and_shows_examples():
    proc = blip2("generate", "--help", env={"COLUMNS": "200"})
    assert proc.returncode == EXIT_OK
    lines = [line.strip(" │") for line in proc.stdout.splitlines()]
    for example in ("blip2 generate photo.jpg",
                    'blip2 generate photo.jpg "Question: what is on the table? Short answer:"',
                    "blip2 generate photos/ --json > captions.jsonl"):
        assert example in lines, proc.stdout
    assert any(line.startswith("blip2 generate") and "--prompt " in line for line in lines)
    for option, words in (("--max-new-tokens", "most tokens"), ("--min-new-tokens", "fewest tokens"),
                          ("--repetition-penalty", "discourages repeating"), ("--prompt-file", "one prompt per line")):
        row = next(line for line in lines if line.startswith(option + " "))
        assert words in row, row
    assert "15 GB" in proc.stdout
