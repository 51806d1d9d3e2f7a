"""CapFilt's ranker: an open_clip CLIP model scoring each image against its candidate captions."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from ..runtime.errors import Blip2Error


class Ranker:
    """An open_clip CLIP model: cosine similarity between an image and each of its candidate captions."""

    def __init__(self, name: str, device: torch.device, dtype: torch.dtype):
        import open_clip

        ident, pretrained = _open_clip_source(name)
        try:
            model, _, self.preprocess = open_clip.create_model_and_transforms(ident, pretrained=pretrained)
            self.tokenizer = open_clip.get_tokenizer(ident)
        except (RuntimeError, FileNotFoundError, ValueError) as e:
            raise Blip2Error(f"ranker {name}: {str(e).splitlines()[0]}") from None
        self.model = model.to(device=device, dtype=dtype).eval()
        self.device, self.dtype = device, dtype

    @torch.no_grad()
    def scores(self, pixel_values: torch.Tensor, candidates: Sequence[Sequence[str]]) -> list[list[float]]:
        """For image ``i``, the cosine similarity of each text in ``candidates[i]``."""
        image = self.model.encode_image(pixel_values.to(self.device, self.dtype)).float()
        image = torch.nn.functional.normalize(image, dim=-1)
        flat = [t for texts in candidates for t in texts]
        text = self._encode_text(self.tokenizer(flat).to(self.device)).float()
        text = torch.nn.functional.normalize(text, dim=-1)
        out, start = [], 0
        for i, texts in enumerate(candidates):
            out.append((text[start:start + len(texts)] @ image[i]).tolist())
            start += len(texts)
        return out


    def _encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """open_clip's ``encode_text``, run only up to the longest text's end token when the text tower is
        causal and pools at that token (OpenAI CLIP): later positions cannot change the pooled feature,
        and captions fill a fraction of the 77-token context."""
        import open_clip
        from open_clip.transformer import text_global_pool

        model = self.model
        if not (type(model) is open_clip.CLIP and model.attn_mask is not None and model.text_pool_type == "argmax"):
            return model.encode_text(tokens)
        length = int(tokens.argmax(dim=-1).max()) + 1
        tokens = tokens[:, :length]
        cast = model.transformer.get_cast_dtype()
        x = model.token_embedding(tokens).to(cast) + model.positional_embedding[:length].to(cast)
        x = model.ln_final(model.transformer(x, attn_mask=model.attn_mask[:length, :length]))
        x = text_global_pool(x, tokens, "argmax")
        if model.text_projection is None:
            return x
        return model.text_projection(x) if isinstance(model.text_projection, torch.nn.Linear) \
            else x @ model.text_projection


OPEN_CLIP_FILES = ["open_clip_config.json", "open_clip_model.safetensors", "open_clip_pytorch_model.bin"]


def _open_clip_source(name: str) -> tuple[str, str | None]:
    """(model name for open_clip, pretrained tag) for a local directory, a registry name, a hub id, or
    an open_clip ``MODEL/TAG`` pair such as ``ViT-L-14/openai``."""
    from . import registry
    from .hub import hub_snapshot, is_hub_id

    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "open_clip_config.json").is_file():
            raise Blip2Error(f"{path}: no open_clip_config.json; not an open_clip model directory")
        return f"local-dir:{path}", None
    entry = registry.lookup(name)
    if entry is not None:
        if entry.kind != "ranker":
            raise Blip2Error(f"{name} is not a CLIP ranker; `blip2 models` lists the rankers")
        name = entry.where
    if name.startswith("hf-hub:"):
        name = name[len("hf-hub:"):]
    import open_clip

    model, _, tag = name.partition("/")
    if tag and model in open_clip.list_models():
        return model, tag
    if is_hub_id(name):
        return f"local-dir:{hub_snapshot(name, patterns=OPEN_CLIP_FILES)}", None
    raise registry.unknown_name(name, kind="ranker")
