"""The names users type, and where each model's weights come from.

Decoding defaults and prompts are not here: each entry names a generation recipe
(``recipes/generate/*.yaml``) that holds them.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass

from ..runtime.errors import Blip2Error

LAVIS_URL = "https://storage.googleapis.com/sfr-vision-language-research/LAVIS/models/BLIP2/"


@dataclass(frozen=True)
class Entry:
    """One name users type: what it is and where its weights come from."""

    name: str
    kind: str  # "blip2" (a whole model), "tower" (image encoder), "llm", "captioner"/"ranker" (CapFilt)
    source: str  # "hf:<repo id>", or "lavis:<url>", or "open_clip:<model>/<tag>"
    description: str
    llm: str | None = None  # for LAVIS stage-2 files: the LLM they were trained with
    vision: str | None = None  # for LAVIS files: the tower they were trained with
    image_size: int = 224
    generation: str | None = None  # generation recipe name
    size_gb: float | None = None  # approximate download size (hub files blip2 fetches, or the URL's file)

    @property
    def where(self) -> str:
        return self.source.split(":", 1)[1]


def _hf(name: str, description: str, size_gb: float, generation: str | None = "caption",
        image_size: int = 224) -> Entry:
    return Entry(name, "blip2", f"hf:Salesforce/{name}", description, image_size=image_size, generation=generation,
                 size_gb=size_gb)


def _lavis(name: str, file: str, description: str, vision: str, llm: str | None = None,
           image_size: int = 224, generation: str | None = "caption") -> Entry:
    return Entry(name, "blip2", f"lavis:{LAVIS_URL}{file}", description, llm=llm, vision=vision,
                 image_size=image_size, generation=generation if llm else None)


ENTRIES: list[Entry] = [
    _hf("blip2-opt-2.7b", "stage-2 pretrained, EVA ViT-g + OPT-2.7B", 15.5),
    _hf("blip2-opt-6.7b", "stage-2 pretrained, EVA ViT-g + OPT-6.7B", 31),
    _hf("blip2-opt-2.7b-coco", "COCO-captioning fine-tuned, OPT-2.7B, 364 px", 15.5, "caption-coco", 364),
    _hf("blip2-opt-6.7b-coco", "COCO-captioning fine-tuned, OPT-6.7B, 364 px", 31, "caption-coco", 364),
    _hf("blip2-flan-t5-xl", "stage-2 pretrained, EVA ViT-g + Flan-T5-XL", 16),
    _hf("blip2-flan-t5-xxl", "stage-2 pretrained, EVA ViT-g + Flan-T5-XXL", 49),
    _hf("blip2-flan-t5-xl-coco", "COCO-captioning fine-tuned, Flan-T5-XL, 364 px", 16, "caption-coco", 364),
    _hf("blip2-itm-vit-g", "stage-1 pretrained Q-Former: ITM and ITC", 4.7, None),
    _hf("blip2-itm-vit-g-coco", "COCO-retrieval fine-tuned Q-Former, 364 px", 4.7, None, 364),
    _lavis("lavis-stage1-vit-g", "blip2_pretrained.pth", "LAVIS stage-1 Q-Former, EVA ViT-g", "eva-g"),
    _lavis("lavis-stage1-vit-l", "blip2_pretrained_vitL.pth", "LAVIS stage-1 Q-Former, CLIP ViT-L", "clip-l"),
    _lavis("lavis-stage1-vit-g-coco", "blip2_finetune_coco.pth", "LAVIS retrieval fine-tuned, ViT-g, 364 px",
           "eva-g", image_size=364),
    _lavis("lavis-stage2-opt-2.7b", "blip2_pretrained_opt2.7b.pth", "LAVIS stage 2, ViT-g + OPT-2.7B", "eva-g",
           "opt-2.7b"),
    _lavis("lavis-stage2-opt-6.7b", "blip2_pretrained_opt6.7b.pth", "LAVIS stage 2, ViT-g + OPT-6.7B", "eva-g",
           "opt-6.7b"),
    _lavis("lavis-stage2-flant5-xl", "blip2_pretrained_flant5xl.pth", "LAVIS stage 2, ViT-g + Flan-T5-XL",
           "eva-g", "flant5-xl"),
    _lavis("lavis-stage2-flant5-xxl", "blip2_pretrained_flant5xxl.pth", "LAVIS stage 2, ViT-g + Flan-T5-XXL",
           "eva-g", "flant5-xxl"),
    _lavis("lavis-stage2-flant5-xl-vit-l", "blip2_pretrained_flant5xl_vitL.pth",
           "LAVIS stage 2, CLIP ViT-L + Flan-T5-XL", "clip-l", "flant5-xl"),
    Entry("eva-g", "tower", f"lavis:{LAVIS_URL}eva_vit_g.pth",
          "EVA-CLIP ViT-g/14 (39 of 40 blocks), as BLIP-2 used it; open_clip EVA01-g-14 has the same layout"),
    Entry("clip-l", "tower", f"lavis:{LAVIS_URL}clip_vit_L.pth",
          "OpenAI CLIP ViT-L/14 (23 of 24 blocks, QuickGELU); open_clip ViT-L-14/openai has the same layout"),
    Entry("opt-2.7b", "llm", "hf:facebook/opt-2.7b", "OPT-2.7B, decoder-only", size_gb=5.3),
    Entry("opt-6.7b", "llm", "hf:facebook/opt-6.7b", "OPT-6.7B, decoder-only", size_gb=13.3),
    Entry("flant5-xl", "llm", "hf:google/flan-t5-xl", "Flan-T5-XL, encoder-decoder", size_gb=11.4),
    Entry("flant5-xxl", "llm", "hf:google/flan-t5-xxl", "Flan-T5-XXL, encoder-decoder", size_gb=45),
    Entry("blip-large-captioner", "captioner", "hf:Salesforce/blip-image-captioning-large",
          "BLIP-large captioner (ViT-L, COCO-finetuned), 384 px: CapFilt's captioner", image_size=384),
    Entry("clip-vit-l-14", "ranker", "hf:timm/vit_large_patch14_clip_224.openai",
          "OpenAI CLIP ViT-L/14 through open_clip: CapFilt's ranker"),
]

REGISTRY: dict[str, Entry] = {e.name: e for e in ENTRIES}


def by_repo(repo_id: str) -> Entry | None:
    """The entry whose weights are the hub repository ``repo_id``, if any."""
    return next((e for e in ENTRIES if e.source == f"hf:{repo_id}"), None)


def lookup(name: str, kind: str | None = None) -> Entry | None:
    """The registry entry called ``name`` (of ``kind``, when given), or None."""
    entry = REGISTRY.get(name)
    return entry if entry is not None and (kind is None or entry.kind == kind) else None


def unknown_name(name: str, kind: str | None = None) -> Blip2Error:
    """The one-line error for a name that is nothing blip2 knows, with the closest known names."""
    names = [e.name for e in ENTRIES if kind is None or e.kind == kind]
    close = difflib.get_close_matches(name, names, n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(close)}?" if close else "; `blip2 models` lists the known names"
    return Blip2Error(f"unknown model {name!r}: not a local path, a registry name or a Hugging Face id{hint}")
