"""Opening images (``blip2cli.images``): the pixel limit, file kinds, 16-bit and EXIF rules, one decode,
through ``blip2 generate`` as users run it and through the modules eval and training use."""

from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

import blip2cli
from blip2cli.config import recipe_path
from blip2cli.runtime.errors import EXIT_OK, EXIT_PARTIAL
from blip2cli.images import MAX_PIXELS, ImageError, TooManyPixels, check_header, open_rgb

from tests.helpers import BLIP2, FAST, assert_one_line_error, blip2, cli_env, error_lines, in_process, records

BIG = 12_000  # 12000 x 12000 = 144 Mpixel: over the limit, under twice Pillow's (where Pillow itself raises)
BOMB = 20_000  # 20000 x 20000 = 400 Mpixel: over twice Pillow's limit


def write_blank_png(path: Path, width: int, height: int) -> Path:
    """A black 1-bit greyscale PNG, compressed row by row: a huge image in a few KB, never held in memory."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = bytes(1 + (width + 7) // 8)  # filter byte, then the packed pixels
    packer = zlib.compressobj(9)
    body = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body) + chunk(b"IEND", b""))
    return path


def peak_rss(*args: str) -> tuple[subprocess.CompletedProcess, int]:
    """``blip2 ARGS`` run from a fresh Python process, and the command's peak resident memory in bytes."""
    probe = ("import json, resource, subprocess, sys\n"
             "p = subprocess.run(sys.argv[1:], capture_output=True, text=True, timeout=300)\n"
             "rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024\n"
             "print(json.dumps([p.returncode, p.stdout, p.stderr, rss]))\n")
    out = subprocess.run([sys.executable, "-c", probe, BLIP2, *args], capture_output=True, text=True, env=cli_env(),
                         timeout=330, check=True)
    code, stdout, stderr, rss = json.loads(out.stdout)
    return subprocess.CompletedProcess(args, code, stdout, stderr), rss


@pytest.fixture(scope="module")
def big_png(tmp_path_factory) -> Path:
    path = write_blank_png(tmp_path_factory.mktemp("big") / "big.png", BIG, BIG)
    assert path.stat().st_size < 100_000
    return path


# ---------------------------------------------------------------- the pixel limit


def test_one_limit_for_every_command():
    """The limit is Pillow's own threshold, and the area ``blip2 prepare`` refuses above, in one place."""
    from blip2cli.data.download import DownloadRecipe

    assert MAX_PIXELS == Image.MAX_IMAGE_PIXELS == 89_478_485
    assert DownloadRecipe().max_image_area == MAX_PIXELS
    for recipe in sorted(recipe_path("prepare/laion").parent.glob("*.yaml")):
        assert yaml.safe_load(recipe.read_text()).get("max_image_area", MAX_PIXELS) == MAX_PIXELS, recipe


def test_144_mpixel_image_is_refused_from_its_header(big_png, hf_opt, tmp_path):
    not_image = tmp_path / "notes.png"
    not_image.write_text("not a picture")
    baseline, baseline_rss = peak_rss("generate", str(not_image), "--model", str(hf_opt))
    assert_one_line_error(baseline, "notes.png: not an image")
    proc, rss = peak_rss("generate", str(big_png), "--model", str(hf_opt))
    assert_one_line_error(proc, str(big_png), "12000x12000", "144,000,000 pixels", "89,478,485", "--max-pixels")
    assert "DecompressionBomb" not in proc.stderr
    assert rss < baseline_rss + 64 * 2**20, (rss, baseline_rss)  # one byte per pixel decoded would be 144 MB


def test_max_pixels_is_the_limit_both_ways(hf_opt, opt, tmp_path):
    image = tmp_path / "wide.png"
    Image.new("RGB", (300, 200), "teal").save(image)
    assert_one_line_error(in_process("generate", str(image), "--model", str(hf_opt), "--max-pixels", "59999", *FAST),
                          "wide.png: 300x200 is 60,000 pixels, over the limit of 59,999")
    proc = in_process("generate", str(image), "--model", str(hf_opt), "--max-pixels", "60000", "--json",
                      "--num-beams", "1", *FAST)
    assert proc.returncode == EXIT_OK, proc.stderr
    assert [r["text"] for r in records(proc)] == [opt.generate(image, num_beams=1, max_new_tokens=4)]
    with pytest.raises(TooManyPixels, match="wide.png: 300x200"):
        opt.generate(image, max_pixels=59_999, num_beams=1, max_new_tokens=4)
    small = blip2cli.load(str(hf_opt), device="cpu", dtype="float32", max_pixels=59_999)
    with pytest.raises(TooManyPixels, match="over the limit of 59,999"):
        small.pixel_values(image)


def test_raised_max_pixels_lets_a_larger_image_through(hf_opt, tmp_path):
    side = 9_500  # 90,250,000 pixels: just over the default limit (and Pillow's warning threshold)
    image = write_blank_png(tmp_path / "large.png", side, side)
    assert_one_line_error(in_process("generate", str(image), "--model", str(hf_opt), *FAST), "large.png", "90,250,000")
    proc = in_process("generate", str(image), "--model", str(hf_opt), "--max-pixels", str(side * side), "--json",
                 "--num-beams", "1", *FAST)
    assert proc.returncode == EXIT_OK, proc.stderr
    assert [r["image"] for r in records(proc)] == [str(image)]
    assert "DecompressionBomb" not in proc.stderr and "Warning" not in proc.stderr


def test_bomb_among_good_images_is_named_and_skipped(hf_opt, image_files, opt, tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    good = []
    for name, source in (("a.png", 0), ("c.png", 1)):
        (folder / name).write_bytes(image_files[source].read_bytes())
        good.append(str(folder / name))
    write_blank_png(folder / "b_bomb.png", BOMB, BOMB)
    proc = in_process("generate", str(folder), "--model", str(hf_opt), "--json", "--num-beams", "1", *FAST)
    assert proc.returncode == EXIT_PARTIAL, proc.stderr
    assert [r["image"] for r in records(proc)] == good
    assert [r["text"] for r in records(proc)] == opt.generate(good, num_beams=1, max_new_tokens=4)
    lines = error_lines(proc)
    assert len(lines) == 1 and lines[0].startswith(f"error: {folder / 'b_bomb.png'}: 20000x20000 is 400,000,000")


def test_header_check_ignores_pillows_own_limit(tmp_path):
    """A limit set above twice Pillow's (where Pillow raises by itself) is ours to apply, not Pillow's."""
    bomb = write_blank_png(tmp_path / "bomb.png", BOMB, BOMB)
    assert check_header(bomb, max_pixels=BOMB * BOMB) == (BOMB, BOMB)
    with pytest.raises(TooManyPixels) as refused:
        check_header(bomb.read_bytes(), name="member.png")
    assert str(refused.value).startswith("member.png: 20000x20000 is 400,000,000 pixels")
    assert Image.MAX_IMAGE_PIXELS == MAX_PIXELS  # Pillow's setting is left as it was


def test_eval_and_training_refuse_a_bomb_by_name(tmp_path, caplog):
    from blip2cli.data.datasets import decode_image
    from blip2cli.eval.data import unreadable_images

    bomb = write_blank_png(tmp_path / "bomb.png", BOMB, BOMB)
    good = tmp_path / "good.png"
    Image.new("RGB", (8, 8)).save(good)
    [line] = unreadable_images([good, bomb])
    assert line.startswith(f"{bomb}: 20000x20000 is 400,000,000 pixels")
    with caplog.at_level("DEBUG", logger="blip2cli.data.datasets"):
        assert decode_image({"__key__": "s1", "png": bomb.read_bytes()}) is None
    assert "s1.png: 20000x20000" in caplog.text
    assert decode_image({"__key__": "s2", "png": good.read_bytes()}).size == (8, 8)


# ---------------------------------------------------------------- files that are not images


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
def test_fifo_is_refused_without_reading(hf_opt, image_files, tmp_path):
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    proc = blip2("generate", fifo, "--model", hf_opt, timeout=120)  # a read would block: the timeout fails it
    assert_one_line_error(proc, f"{fifo}: is a FIFO (named pipe), not an image file")
    (tmp_path / "a.png").write_bytes(image_files[0].read_bytes())
    proc = in_process("generate", str(tmp_path), "--model", str(hf_opt), "--json", "--num-beams", "1", *FAST)
    assert proc.returncode == EXIT_PARTIAL, proc.stderr
    assert [r["image"] for r in records(proc)] == [str(tmp_path / "a.png")]
    assert error_lines(proc) == [f"error: {fifo}: is a FIFO (named pipe), not an image file"]


@pytest.mark.skipif(not os.path.exists("/dev/zero"), reason="no /dev/zero here")
def test_devices_and_directories_are_refused(hf_opt, tmp_path):
    proc = blip2("generate", "/dev/zero", "--model", hf_opt, timeout=120)  # reading it would never end
    assert_one_line_error(proc, "/dev/zero: is a character device, not an image file")
    for source, kind in (("/dev/zero", "a character device"), (str(tmp_path), "a directory")):
        for use in (check_header, open_rgb):
            with pytest.raises(ImageError, match=f"^{source}: is {kind}, not an image file$"):
                use(source)
    with pytest.raises(ImageError, match="^missing.png: no such file$"):
        open_rgb("missing.png")


# ---------------------------------------------------------------- pixel formats


def test_16_bit_greyscale_keeps_its_high_byte(opt, tmp_path):
    values = np.arange(65536, dtype=np.uint16).reshape(256, 256)  # every 16-bit value once
    png16 = tmp_path / "grey16.png"
    Image.fromarray(values).save(png16)
    with Image.open(png16) as stored:
        assert stored.mode == "I;16"
    expected = (values >> 8).astype(np.uint8)
    rgb = np.asarray(open_rgb(png16))
    assert rgb.shape == (256, 256, 3)
    for channel in range(3):
        np.testing.assert_array_equal(rgb[..., channel], expected)
    pgm16 = tmp_path / "grey16.pgm"  # Pillow opens 16-bit PGM as mode I
    Image.fromarray(values).save(pgm16)
    with Image.open(pgm16) as stored:
        assert stored.mode == "I"
    np.testing.assert_array_equal(np.asarray(open_rgb(pgm16))[..., 0], expected)
    png8 = tmp_path / "grey8.png"
    Image.fromarray(expected, "L").save(png8)
    assert opt.pixel_values(png16).equal(opt.pixel_values(png8))  # what the model sees


@pytest.mark.parametrize("mode", ["1", "L", "LA", "P", "RGBA", "CMYK"])
def test_other_modes_convert_as_lavis(mode, tmp_path):
    source = Image.fromarray(np.random.default_rng(0).integers(0, 256, (12, 10, 3), dtype=np.uint8)).convert(mode)
    path = tmp_path / ("x.tif" if mode == "CMYK" else "x.png")
    source.save(path)
    with Image.open(path) as lavis:
        expected = lavis.convert("RGB")
    assert open_rgb(path).tobytes() == expected.tobytes()


# ---------------------------------------------------------------- EXIF orientation


@pytest.fixture
def rotated_jpeg(tmp_path) -> Path:
    """A 40x20 JPEG whose EXIF says "rotate 90 degrees clockwise to view" (orientation 6)."""
    image = Image.new("RGB", (40, 20), "red")
    image.paste((0, 0, 255), (20, 0, 40, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "rotated.jpg"
    image.save(path, exif=exif, quality=95)
    return path


def test_exif_orientation_ignored_unless_asked(rotated_jpeg):
    from blip2cli.data.datasets import decode_image

    assert open_rgb(rotated_jpeg).size == (40, 20)  # LAVIS: the pixels as stored (eval reads through open_rgb)
    assert decode_image({"__key__": "k", "jpg": rotated_jpeg.read_bytes()}).size == (40, 20)  # training, CapFilt
    upright = open_rgb(rotated_jpeg, exif_transpose=True)
    assert upright.size == (20, 40)
    assert upright.getpixel((10, 5))[0] > 200 and upright.getpixel((10, 35))[2] > 200  # the left (red) on top


def test_generate_turns_photos_upright_unless_told_not_to(hf_opt, opt, rotated_jpeg):
    assert not opt.pixel_values(rotated_jpeg).equal(opt.pixel_values(open_rgb(rotated_jpeg, exif_transpose=True)))
    kw = {"num_beams": 1, "max_new_tokens": 4}
    for flags, upright in (((), True), (("--no-exif-transpose",), False)):
        proc = in_process("generate", str(rotated_jpeg), "--model", str(hf_opt), "--json", *flags, "--num-beams", "1",
                          *FAST)
        assert proc.returncode == EXIT_OK, proc.stderr
        assert [r["text"] for r in records(proc)] == [opt.generate(rotated_jpeg, exif_transpose=upright, **kw)]
    assert opt.generate(rotated_jpeg, **kw) == opt.generate(rotated_jpeg, exif_transpose=False, **kw)


# ---------------------------------------------------------------- one decode


def test_each_image_is_decoded_once(hf_opt, image_files, monkeypatch, capsys):
    from PIL import ImageFile

    from blip2cli.cli.app import main

    decoded: list[tuple[int, int]] = []
    real_load = ImageFile.ImageFile.load

    def counting_load(self):
        if self.tile:  # pixels still to decode
            decoded.append(self.size)
        return real_load(self)

    images = [str(p) for p in image_files[:3]]
    monkeypatch.setattr(ImageFile.ImageFile, "load", counting_load)
    monkeypatch.setattr(sys, "argv", ["blip2", "generate", *images, "--model", str(hf_opt), "--json",
                                      "--num-beams", "1", "--batch-size", "2", *FAST])
    main()
    assert [json.loads(line)["image"] for line in capsys.readouterr().out.splitlines()] == images
    assert sorted(decoded) == sorted(check_header(p) for p in images)


def test_bytes_and_in_memory_images(tmp_path):
    buffer = io.BytesIO()
    Image.new("RGB", (6, 4), "green").save(buffer, "PNG")
    assert open_rgb(buffer.getvalue()).size == (6, 4)
    with pytest.raises(ImageError, match="^member.jpg: not an image file"):
        open_rgb(b"not an image", name="member.jpg")
    grey16 = Image.fromarray(np.full((2, 2), 0x1234, dtype=np.uint16))
    assert open_rgb(grey16).getpixel((0, 0)) == (0x12, 0x12, 0x12)
