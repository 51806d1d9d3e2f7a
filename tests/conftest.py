"""Session fixtures: tiny random BLIP-2 checkpoints in transformers' format, built offline."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

from . import tiny  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def hf_opt(tmp_path_factory):
    return tiny.make_hf_opt(tmp_path_factory.mktemp("hf") / "opt")


@pytest.fixture(scope="session")
def hf_t5(tmp_path_factory):
    return tiny.make_hf_t5(tmp_path_factory.mktemp("hf") / "t5")


@pytest.fixture(scope="session")
def hf_itm(tmp_path_factory):
    return tiny.make_hf_itm(tmp_path_factory.mktemp("hf") / "itm")


@pytest.fixture(scope="session")
def image_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    paths = []
    for i in range(5):
        p = root / f"img{i}.png"
        tiny.draw_image(i).save(p)
        paths.append(p)
    return paths
