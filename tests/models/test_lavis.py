"""LAVIS ``.pth`` files: the tiny transformers weights written back to LAVIS's layout load and agree."""

from __future__ import annotations

import pytest
import torch

import blip2cli
from blip2cli.api import Blip2
from blip2cli.runtime.errors import Blip2Error
from blip2cli.models.formats.lavis import load_lavis

from tests.helpers import blip2
from tests.tiny import NUM_QUERIES, PROMPTS, TEXTS, TINY_VIT, hf_inputs, llm_dir, write_lavis


@pytest.mark.parametrize("kind", ["opt", "t5"])
def test_lavis_stage2_file_matches_transformers(kind, hf_opt, hf_t5, image_files, tmp_path):
    from transformers import Blip2ForConditionalGeneration

    hf_dir = hf_opt if kind == "opt" else hf_t5
    blip = blip2cli.load(str(hf_dir), device="cpu", dtype="float32")
    pth = tmp_path / "blip2_tiny.pth"
    write_lavis(blip, pth, kind)
    lm = llm_dir(blip, tmp_path / "llm")
    ckpt = load_lavis(pth, llm=str(lm), vision=TINY_VIT, qformer_heads=4)
    ours = Blip2(ckpt, torch.device("cpu"), torch.float32)

    ref = Blip2ForConditionalGeneration.from_pretrained(hf_dir).eval()
    ref.vision_model.post_layernorm.eps = 1e-5  # LAVIS's ln_vision is a default nn.LayerNorm
    inputs = hf_inputs(hf_dir, blip, image_files[:4], PROMPTS)
    extra = {"decoder_input_ids": torch.tensor([[0, 5, 6]] * 4)} if kind == "t5" else {}
    with torch.no_grad():
        expected = ref(**inputs, **extra).logits
        got = ours.net(inputs["pixel_values"], inputs["input_ids"][:, NUM_QUERIES:],
                       inputs["attention_mask"][:, NUM_QUERIES:], **extra).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    ours.net.ln_vision.eps = 1e-6  # now the very weights of the transformers checkpoint: same search
    kw = dict(num_beams=5, max_new_tokens=6)
    assert ours.generate(image_files[:4], PROMPTS, **kw) == blip.generate(image_files[:4], PROMPTS, **kw)


def test_lavis_stage1_file_matches_transformers_itm(hf_itm, image_files, tmp_path):
    blip = blip2cli.load(str(hf_itm), device="cpu", dtype="float32")
    pth = tmp_path / "blip2_pretrained_tiny.pth"
    write_lavis(blip, pth, None)
    raw = torch.load(pth, weights_only=True)
    raw["model"]["temp"] = torch.tensor(0.05)
    torch.save(raw, pth)
    ckpt = load_lavis(pth, vision=TINY_VIT, qformer_heads=4, qformer_tokenizer=str(hf_itm))
    ours = Blip2(ckpt, torch.device("cpu"), torch.float32)
    assert ours.net.temp.item() == pytest.approx(0.05)
    ours.net.ln_vision.eps = 1e-6  # compare with the transformers checkpoint's LayerNorm
    torch.testing.assert_close(ours.itm(image_files[:4], TEXTS), blip.itm(image_files[:4], TEXTS), atol=1e-5, rtol=0)
    torch.testing.assert_close(ours.itc(image_files[:3], TEXTS), blip.itc(image_files[:3], TEXTS), atol=1e-5, rtol=0)


def test_stage2_file_without_llm_is_refused(hf_opt, tmp_path):
    blip = blip2cli.load(str(hf_opt), device="cpu", dtype="float32")
    pth = tmp_path / "s2.pth"
    write_lavis(blip, pth, "opt")
    with pytest.raises(Blip2Error, match="--llm"):
        load_lavis(pth, vision=TINY_VIT)


def test_unexpected_and_missing_keys_are_named(hf_opt, tmp_path):
    blip = blip2cli.load(str(hf_opt), device="cpu", dtype="float32")
    lm = llm_dir(blip, tmp_path / "llm")
    pth = tmp_path / "s2.pth"
    write_lavis(blip, pth, "opt")
    raw = torch.load(pth, weights_only=True)["model"]
    raw["Qformer.bert.encoder.layer.0.surprise.weight"] = torch.zeros(2)
    torch.save(raw, tmp_path / "extra.pth")
    with pytest.raises(Blip2Error, match="unexpected keys Qformer.bert.encoder.layer.0.surprise.weight"):
        load_lavis(tmp_path / "extra.pth", llm=str(lm), vision=TINY_VIT, qformer_heads=4)
    del raw["Qformer.bert.encoder.layer.0.surprise.weight"]
    del raw["Qformer.bert.encoder.layer.1.output_query.dense.bias"]
    torch.save(raw, tmp_path / "missing.pth")
    with pytest.raises(Blip2Error, match="missing keys qformer.layers.1.query_ffn.fc2.bias"):
        load_lavis(tmp_path / "missing.pth", llm=str(lm), vision=TINY_VIT, qformer_heads=4)


def test_lavis_file_exports_to_transformers(hf_opt, image_files, tmp_path):
    from transformers import Blip2ForConditionalGeneration

    from blip2cli.models.formats.hf import export_hf

    blip = blip2cli.load(str(hf_opt), device="cpu", dtype="float32")
    pth = tmp_path / "s2.pth"
    write_lavis(blip, pth, "opt")
    ckpt = load_lavis(pth, llm=str(llm_dir(blip, tmp_path / "llm")), vision=TINY_VIT, qformer_heads=4)
    assert ckpt.config.image_token_id is None  # LAVIS has no <image> token; export supplies one
    exported = Blip2ForConditionalGeneration.from_pretrained(export_hf(ckpt, tmp_path / "hf")).eval()
    ref = Blip2ForConditionalGeneration.from_pretrained(hf_opt).eval()
    assert exported.config.image_token_id == ref.config.image_token_id
    inputs = hf_inputs(hf_opt, blip, image_files[:3], PROMPTS[:3])
    with torch.no_grad():  # (LAVIS has no k-bias; a key bias shifts every score equally, so only rounding moves)
        torch.testing.assert_close(exported(**inputs).logits, ref(**inputs).logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["opt", "t5"])
def test_tied_llm_copies_saved_by_lavis_runner_are_accepted(kind, hf_opt, hf_t5, image_files, tmp_path, capsys):
    blip = blip2cli.load(str(hf_opt if kind == "opt" else hf_t5), device="cpu", dtype="float32")
    lm = llm_dir(blip, tmp_path / "llm")
    write_lavis(blip, tmp_path / "plain.pth", kind)
    write_lavis(blip, tmp_path / "runner.pth", kind, tied_llm_copies=True)
    raw = torch.load(tmp_path / "runner.pth", weights_only=True)["model"]
    copies = sorted(k for k in raw if k.startswith(("opt_model.", "t5_model.")))
    tied = ["opt_model.lm_head.weight"] if kind == "opt" else [
        "t5_model.decoder.embed_tokens.weight", "t5_model.encoder.embed_tokens.weight"]  # Flan-T5's
    assert set(tied) <= set(copies) <= set(tied) | {"t5_model.lm_head.weight"}  # the tiny T5 ties its LM head too

    def generate(name: str) -> list[str]:
        ckpt = load_lavis(tmp_path / name, llm=str(lm), vision=TINY_VIT, qformer_heads=4)
        return Blip2(ckpt, torch.device("cpu"), torch.float32).generate(image_files[:3], PROMPTS[:3], num_beams=3,
                                                                        max_new_tokens=5)

    expected = generate("plain.pth")
    capsys.readouterr()
    assert generate("runner.pth") == expected
    assert capsys.readouterr().err == ""

    raw[copies[0]] = raw[copies[0]] + 1.0  # a copy that is not the LLM's weight: named, ignored
    torch.save({"model": raw}, tmp_path / "changed.pth")
    assert generate("changed.pth") == expected
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and copies[0] in lines[0] and "differ" in lines[0], lines
    assert not any(c in lines[0] for c in copies[1:])

    other = "opt_model.model.decoder.layers.0.fc1.weight" if kind == "opt" else "t5_model.shared.weight"
    raw[other] = torch.zeros(2)  # any other LLM key is still an error
    torch.save({"model": raw}, tmp_path / "other.pth")
    with pytest.raises(Blip2Error, match=f"unexpected keys {other}"):
        load_lavis(tmp_path / "other.pth", llm=str(lm), vision=TINY_VIT, qformer_heads=4)


# --- what --llm names and what the hub sends


@pytest.mark.parametrize("model_type", ["custom-lm", "opt"])
def test_llm_directory_asking_to_run_its_own_code_is_refused(model_type, hf_opt, tmp_path, image_files):
    """A config with ``auto_map`` (code shipped with the checkpoint) is refused in one line, and the code never
    runs: not imported, no prompt; also when transformers knows the model type and would load it without it."""
    import json

    blip = blip2cli.load(str(hf_opt), device="cpu", dtype="float32")
    pth = tmp_path / "s2.pth"
    write_lavis(blip, pth, "opt")
    lm = llm_dir(blip, tmp_path / "llm")
    marker = tmp_path / "code-ran"
    (lm / "custom_lm.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n"
                                     "from transformers import OPTConfig, OPTForCausalLM\n"
                                     "class CustomConfig(OPTConfig):\n    model_type = 'custom-lm'\n"
                                     "class CustomLM(OPTForCausalLM):\n    config_class = CustomConfig\n")
    config = json.loads((lm / "config.json").read_text())
    config.update(model_type=model_type, auto_map={"AutoConfig": "custom_lm.CustomConfig",
                                                   "AutoModelForCausalLM": "custom_lm.CustomLM"})
    (lm / "config.json").write_text(json.dumps(config))
    with pytest.raises(Blip2Error, match="auto_map") as err:
        load_lavis(pth, llm=str(lm), vision=TINY_VIT, qformer_heads=4)
    assert "\n" not in str(err.value)
    proc = blip2("generate", image_files[0], "--model", pth, "--llm", lm, timeout=300)  # stdin empty: no prompt
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert [line for line in proc.stderr.splitlines() if line.strip()] == [f"error: {err.value}"]
    assert not marker.exists()


def test_hub_download_is_announced_with_its_size(monkeypatch, tmp_path, capsys):
    """Before a hub model that is not cached is downloaded: one stderr line with its id and, for a registry
    model, its approximate size. A cached model, or offline mode, says nothing."""
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    from blip2cli.models import hub

    cached: set[str] = set()

    def snapshot_download(repo_id, allow_patterns=None, local_files_only=False, **kw):  # no network in tests
        if local_files_only and repo_id not in cached:
            raise LocalEntryNotFoundError(f"{repo_id} is not cached")
        cached.add(repo_id)
        return str(tmp_path)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "BLIP2_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    assert hub.hub_snapshot("Salesforce/blip2-opt-2.7b") == tmp_path
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and "Salesforce/blip2-opt-2.7b" in lines[0] and "15.5 GB" in lines[0], lines
    hub.hub_snapshot("Salesforce/blip2-opt-2.7b")  # cached now
    assert capsys.readouterr().err == ""
    hub.hub_snapshot("someone/unlisted-model")
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and "someone/unlisted-model" in lines[0] and "GB" not in lines[0], lines
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(Blip2Error, match="not in the Hugging Face cache"):
        hub.hub_snapshot("Salesforce/blip2-flan-t5-xl")
    assert capsys.readouterr().err == ""
