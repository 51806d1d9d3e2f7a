"""Image towers and full-size shapes: pruned towers equal the libraries' own penultimate tokens, and
full-size networks built on the meta device have exactly the reference parameter counts."""

from __future__ import annotations

import numpy as np
import torch

from blip2cli.models.blip2 import Blip2Config, Blip2ImageToText, Blip2Stage1
from blip2cli.models.components import TOWERS
from blip2cli.models.qformer import QFormerConfig
from blip2cli.models.vision import VisionConfig, VisionTower, image_transform

from tests.tiny import draw_image


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _randomised(module: torch.nn.Module) -> torch.nn.Module:
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(0.2 * torch.randn(p.shape, generator=g))
    return module.eval()


def test_pruned_eva_equals_timm_penultimate_tokens():
    from timm.models.eva import Eva

    cfg = VisionConfig(kind="eva", image_size=28, patch_size=7, width=32, layers=3, heads=4, mlp_dim=80)
    full = _randomised(Eva(img_size=28, patch_size=7, embed_dim=32, depth=4, num_heads=4, mlp_ratio=80 / 32,
                           num_classes=0))
    tower = VisionTower(cfg).eval()
    missing, unexpected = tower.trunk.load_state_dict(full.state_dict(), strict=False)
    assert not missing and set(unexpected) == {k for k in full.state_dict() if k.startswith(("blocks.3.", "norm.", "fc_norm."))}
    x = torch.randn(2, 3, 28, 28)
    out = full.forward_intermediates(x, indices=[2], norm=False, stop_early=True, output_fmt="NLC",
                                     intermediates_only=True, return_prefix_tokens=True)
    spatial, prefix = out[0]
    expected = torch.cat([prefix, spatial], dim=1)
    with torch.no_grad():
        got = tower(x)
    assert got.shape == (2, 17, 32)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_pruned_clip_equals_open_clip_penultimate_tokens():
    from open_clip.transformer import QuickGELU, VisionTransformer

    cfg = VisionConfig(kind="clip", image_size=28, patch_size=7, width=32, layers=3, heads=4, mlp_dim=128,
                       quick_gelu=True)
    full = _randomised(VisionTransformer(image_size=28, patch_size=7, width=32, layers=4, heads=4, mlp_ratio=4.0,
                                         act_layer=QuickGELU, output_dim=16))
    tower = VisionTower(cfg).eval()
    missing, unexpected = tower.trunk.load_state_dict(full.state_dict(), strict=False)
    assert not missing
    assert set(unexpected) == {k for k in full.state_dict() if k.startswith(("transformer.resblocks.3.", "ln_post.", "proj"))}
    x = torch.randn(2, 3, 28, 28)
    out = full.forward_intermediates(x, indices=[2], stop_early=True, intermediates_only=True, output_fmt="NLC",
                                     output_extra_tokens=True)
    expected = torch.cat([out["image_intermediates_prefix"][0], out["image_intermediates"][0]], dim=1)
    with torch.no_grad():
        got = tower(x)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_full_size_towers_match_library_counts():
    import open_clip
    import timm

    with torch.device("meta"):
        eva = VisionTower(TOWERS["eva-g"])
        clip = VisionTower(TOWERS["clip-l"])
        eva_full = timm.create_model("eva_giant_patch14_224", pretrained=False, num_classes=0)
        clip_full = open_clip.create_model("ViT-L-14", pretrained=None, device="meta").visual
    assert count(eva) == (count(eva_full) - count(eva_full.blocks[39]) - count(eva_full.norm)
                         - count(eva_full.fc_norm)) == 985_894_528
    assert count(clip) == (count(clip_full) - count(clip_full.transformer.resblocks[23]) - count(clip_full.ln_post)
                           - clip_full.proj.numel()) == 290_581_504


def _k_bias_count(vision_cfg) -> int:
    # transformers stores the ViT's (always zero) k-bias as parameters; timm keeps it as a buffer
    return vision_cfg.layers * vision_cfg.width


def test_full_size_networks_match_transformers_counts():
    from transformers import Blip2Config as HFConfig
    from transformers import Blip2ForConditionalGeneration, Blip2ForImageTextRetrieval, OPTConfig

    eva = TOWERS["eva-g"]
    opt = OPTConfig(hidden_size=2560, num_hidden_layers=32, ffn_dim=10240, num_attention_heads=32,
                    word_embed_proj_dim=2560, vocab_size=50304, eos_token_id=50118).to_dict()
    with torch.device("meta"):
        hf_gen = Blip2ForConditionalGeneration(HFConfig(text_config=opt, image_token_index=50265))
        ours_gen = Blip2ImageToText(Blip2Config(vision=eva, qformer=QFormerConfig(has_text=False, has_lm_head=False),
                                                text=opt))
        hf_itm = Blip2ForImageTextRetrieval(HFConfig(qformer_config=dict(use_qformer_text_input=True,
                                                                         vocab_size=30523)))
        ours_s1 = Blip2Stage1(Blip2Config(vision=eva))
    assert count(ours_gen) == count(hf_gen) - _k_bias_count(eva)
    lm_head = count(ours_s1.qformer.lm_head) - ours_s1.qformer.lm_head.decoder.weight.numel()  # tied weight
    assert count(ours_s1) == count(hf_itm) - _k_bias_count(eva) + lm_head + 1  # + ITG head, + temperature
    trainable = count(ours_s1) - count(ours_s1.vision)
    assert 186e6 < trainable < 189e6  # the paper's ~188M Q-Former (queries, projections, heads)


def test_image_transform_equals_transformers_pil_processor():
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

    from blip2cli.models.vision import CLIP_MEAN, CLIP_STD

    proc = BlipImageProcessorPil(size={"height": 24, "width": 24}, image_mean=CLIP_MEAN, image_std=CLIP_STD)
    images = [draw_image(i, size=40) for i in range(3)]
    expected = np.stack(proc(images, return_tensors="np")["pixel_values"])
    got = torch.stack([image_transform(24)(im) for im in images]).numpy()
    np.testing.assert_allclose(got, expected, atol=1e-6, rtol=0)


def lavis_interpolate_pos_embed(pos: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """LAVIS's ``interpolate_pos_embed`` (from BEiT/DeiT), written out: the CLS position kept, the patch grid
    resampled bicubically (``align_corners=False``, no antialiasing)."""
    width = pos.shape[-1]
    old, new = int((pos.shape[-2] - 1) ** 0.5), int((new_tokens - 1) ** 0.5)
    grid = pos[:, 1:].reshape(-1, old, old, width).permute(0, 3, 1, 2)
    grid = torch.nn.functional.interpolate(grid, size=(new, new), mode="bicubic", align_corners=False)
    return torch.cat([pos[:, :1], grid.permute(0, 2, 3, 1).flatten(1, 2)], dim=1)


def test_position_embeddings_resample_as_lavis_for_fine_tuning_sizes():
    """A 224-px tower's positions at the fine-tuning sizes (364 px for captioning and retrieval, 490 for VQA) and
    back, as LAVIS resamples them."""
    from blip2cli.models.components import resample_pos

    torch.manual_seed(0)
    pos = torch.randn(1, 16 * 16 + 1, 32)
    for size in (364, 490, 224, 112):
        cfg = VisionConfig(image_size=size, patch_size=14, width=32)
        got = resample_pos(pos, cfg, "test")
        assert got.shape == (1, cfg.num_tokens, 32)
        torch.testing.assert_close(got, lavis_interpolate_pos_embed(pos, cfg.num_tokens), atol=1e-6, rtol=0)


def test_gradient_checkpointing_gives_the_same_gradients():
    """A trained tower that recomputes its blocks in backward gives the gradients of one that keeps them."""
    torch.manual_seed(0)
    cfg = VisionConfig(image_size=32, patch_size=8, width=32, layers=2, heads=4, mlp_dim=64)
    grads, block_runs = [], []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        tower = VisionTower(cfg).train()
        tower.set_grad_checkpointing(checkpointing)
        runs = []
        tower.trunk.blocks[0].register_forward_pre_hook(lambda *args: runs.append(1))
        pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
        tower(pixels).square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in tower.named_parameters() if p.grad is not None})
        block_runs.append(len(runs))
    assert block_runs == [1, 2]  # recomputed in backward only with checkpointing
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 10
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-6, rtol=1e-5)
