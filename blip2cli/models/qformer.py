"""The Querying Transformer: a post-LN BERT with learned queries and cross-attention to image tokens.

One set of weights serves every BLIP-2 use:

- image side: the learned queries alone, cross-attending to the frozen image tokens;
- text side: text alone (ITC text encoder);
- multimodal: ``[queries; text]`` with a bi-directional mask (ITM);
- generation: ``[queries; text]`` with the multimodal-causal mask (ITG), or text decoded against a
  key/value cache of the queries.

Queries and text share the self-attention layers but have separate feed-forward networks; only query
rows cross-attend to the image. Attention runs through ``scaled_dot_product_attention``.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import torch
import torch.nn.functional as F
from torch import nn

KVCache = list[tuple[torch.Tensor, torch.Tensor]]


@dataclass
class QFormerConfig:
    """Shape of a Q-Former. The defaults are BLIP-2's (BERT-base, 32 queries, ViT-g width)."""

    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    encoder_width: int = 1408
    num_query_tokens: int = 32
    cross_attention_frequency: int = 2
    vocab_size: int = 30523
    max_position_embeddings: int = 512
    layer_norm_eps: float = 1e-12
    dropout: float = 0.1
    attention_dropout: float = 0.1
    pad_token_id: int = 0
    # The most text tokens ([CLS] and [SEP] included) the Q-Former reads: the length its text side was trained
    # with (BLIP-2's 32; a stage-1 run stores its recipe's stage1.max_txt_len). See ``qformer_text``.
    max_txt_len: int = 32
    # The text side (word/position embeddings and text FFNs); stage-2 checkpoints drop it.
    has_text: bool = True
    # The ITG language-model head, tied to the word embeddings; needs ``has_text``.
    has_lm_head: bool = True

    def __post_init__(self) -> None:
        if self.has_lm_head and not self.has_text:
            raise ValueError("a Q-Former LM head needs the text side (has_text)")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of num_heads {self.num_heads}")


class MaskMode(str, Enum):
    """Self-attention patterns over a ``[queries; text]`` sequence (BLIP-2 paper, figure 2)."""

    UNIMODAL = "unimodal"  # ITC: queries and text do not see each other
    BIDIRECTIONAL = "bidirectional"  # ITM: everything sees everything
    CAUSAL = "causal"  # ITG: queries see queries; text sees all queries and earlier text


def self_attention_mask(
    mode: MaskMode | str,
    num_queries: int,
    text_mask: torch.Tensor | None,
    num_past: int = 0,
    batch_size: int | None = None,
    device: torch.device | None = None,
) -> torch.Tensor:
    """Boolean mask ``(B, 1, rows, keys)``, True where a row may attend to a key.

    ``num_queries`` query rows come first, then the text rows of ``text_mask`` (``(B, T)``, 1 for real
    tokens). ``num_past`` cached keys (queries first, then earlier text, all attendable) precede the keys
    of the current rows; with a cache the current rows are text only.
    """
    mode = MaskMode(mode)
    if text_mask is None:
        assert batch_size is not None
        text_mask = torch.ones(batch_size, 0, dtype=torch.long, device=device)
    b, t = text_mask.shape
    device = text_mask.device
    q = num_queries
    rows = q + t
    keys_now = torch.cat([torch.ones(b, q, dtype=torch.bool, device=device), text_mask.bool()], dim=1)
    allowed = torch.ones(rows, rows, dtype=torch.bool, device=device)
    if mode is MaskMode.UNIMODAL:
        allowed[:q, q:] = False
        allowed[q:, :q] = False
    elif mode is MaskMode.CAUSAL:
        allowed[:q, q:] = False
        allowed[q:, q:] = torch.ones(t, t, dtype=torch.bool, device=device).tril()
    mask = allowed.unsqueeze(0) & keys_now.unsqueeze(1)  # (B, rows, rows)
    if num_past:
        past = torch.ones(b, rows, num_past, dtype=torch.bool, device=device)
        if mode is not MaskMode.BIDIRECTIONAL and q:
            raise ValueError("with a cache the current rows must be text only")
        mask = torch.cat([past, mask], dim=2)
    return mask.unsqueeze(1)


def padding_mask(key_mask: torch.Tensor) -> torch.Tensor:
    """Boolean ``(B, 1, 1, K)`` mask from a ``(B, K)`` 0/1 key mask."""
    return key_mask.bool()[:, None, None, :]


class Attention(nn.Module):
    """Multi-head attention with BERT's post-LN residual block (dense, dropout, LayerNorm)."""

    def __init__(self, cfg: QFormerConfig, kv_width: int) -> None:
        super().__init__()
        d = cfg.hidden_size
        self.num_heads = cfg.num_heads
        self.attention_dropout = cfg.attention_dropout
        self.query = nn.Linear(d, d)
        self.key = nn.Linear(kv_width, d)
        self.value = nn.Linear(kv_width, d)
        self.out = nn.Linear(d, d)
        self.norm = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.dropout)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        return x.view(b, n, self.num_heads, -1).transpose(1, 2)

    def forward(
        self,
        x: torch.Tensor,
        kv_input: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        past: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """Attend from ``x`` to ``kv_input`` (default: ``x``, plus ``past`` keys/values).

        Returns the block output and this call's keys/values (cache included), for reuse.
        """
        source = x if kv_input is None else kv_input
        q = self._heads(self.query(x))
        k = self._heads(self.key(source))
        v = self._heads(self.value(source))
        if past is not None:
            k = torch.cat([past[0], k], dim=2)
            v = torch.cat([past[1], v], dim=2)
        attn = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.attention_dropout if self.training else 0.0
        )
        attn = attn.transpose(1, 2).flatten(2)
        return self.norm(self.dropout(self.out(attn)) + x), (k, v)


class FeedForward(nn.Module):
    """BERT's FFN block: dense, GELU, dense, dropout, then LayerNorm over the residual."""

    def __init__(self, cfg: QFormerConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.dropout(self.fc2(F.gelu(self.fc1(x)))) + x)


class QFormerLayer(nn.Module):
    """One Q-Former layer: self-attention over queries and text, cross-attention to the image (every
    ``cross_attention_frequency`` layers, queries only), and separate query and text feed-forward blocks."""

    def __init__(self, cfg: QFormerConfig, has_cross_attention: bool) -> None:
        super().__init__()
        self.self_attn = Attention(cfg, cfg.hidden_size)
        self.cross_attn = Attention(cfg, cfg.encoder_width) if has_cross_attention else None
        self.query_ffn = FeedForward(cfg)
        self.text_ffn = FeedForward(cfg) if cfg.has_text else None

    def forward(
        self,
        x: torch.Tensor,
        num_queries: int,
        self_mask: torch.Tensor | None,
        image: torch.Tensor | None,
        past: tuple[torch.Tensor, torch.Tensor] | None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        x, kv = self.self_attn(x, mask=self_mask, past=past)
        queries, text = x[:, :num_queries], x[:, num_queries:]
        parts = []
        if num_queries:
            if self.cross_attn is not None:
                if image is None:
                    raise ValueError("query rows need image tokens to cross-attend to")
                queries, _ = self.cross_attn(queries, kv_input=image)
            parts.append(self.query_ffn(queries))
        if text.shape[1]:
            if self.text_ffn is None:
                raise ValueError("this Q-Former has no text side (a stage-2 checkpoint); text input is not possible")
            parts.append(self.text_ffn(text))
        return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0], kv


class TextEmbeddings(nn.Module):
    """Word plus absolute position embeddings (no token types), as in BLIP-2's BERT."""

    def __init__(self, cfg: QFormerConfig) -> None:
        super().__init__()
        self.word = nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=cfg.pad_token_id)
        self.position = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)

    def forward(self, input_ids: torch.Tensor, position_offset: int = 0) -> torch.Tensor:
        positions = torch.arange(position_offset, position_offset + input_ids.shape[1], device=input_ids.device)
        return self.word(input_ids) + self.position(positions)


class LMHead(nn.Module):
    """BERT's prediction head: dense, GELU, LayerNorm, then the (tied) vocabulary projection."""

    def __init__(self, cfg: QFormerConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.decoder = nn.Linear(cfg.hidden_size, cfg.vocab_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.norm(F.gelu(self.dense(x))))


@dataclass
class QFormerOutput:
    """The Q-Former's last hidden states, queries first, then text."""

    hidden_states: torch.Tensor  # (B, queries + text, hidden)
    num_queries: int
    cache: KVCache | None = None

    @property
    def query_states(self) -> torch.Tensor:
        return self.hidden_states[:, : self.num_queries]

    @property
    def text_states(self) -> torch.Tensor:
        return self.hidden_states[:, self.num_queries :]


class QFormer(nn.Module):
    """Learned queries and a BERT encoder whose even layers cross-attend to image tokens."""

    def __init__(self, cfg: QFormerConfig) -> None:
        super().__init__()
        self.config = cfg
        # N(0, 0.02) as LAVIS (transformers starts from zeros, which a LayerNorm turns into huge gradients)
        self.query_tokens = nn.Parameter(torch.randn(1, cfg.num_query_tokens, cfg.hidden_size) * 0.02)
        self.embeddings = TextEmbeddings(cfg) if cfg.has_text else None
        self.embed_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.embed_dropout = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(
            QFormerLayer(cfg, has_cross_attention=i % cfg.cross_attention_frequency == 0)
            for i in range(cfg.num_layers)
        )
        self.lm_head = LMHead(cfg) if cfg.has_lm_head else None
        self.tie_weights()

    def tie_weights(self) -> None:
        """Tie the LM head's vocabulary projection to the word embeddings (BERT's tying)."""
        if self.lm_head is not None and self.embeddings is not None:
            self.lm_head.decoder.weight = self.embeddings.word.weight

    def forward(
        self,
        image: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        text_mask: torch.Tensor | None = None,
        mode: MaskMode | str = MaskMode.BIDIRECTIONAL,
        use_queries: bool = True,
        past: KVCache | None = None,
        use_cache: bool = False,
    ) -> QFormerOutput:
        """Run ``[queries; text]`` (either part optional) through the encoder.

        ``image`` (B, N, encoder_width) feeds the cross-attention of the query rows. ``past`` holds the
        per-layer keys/values of earlier rows (the queries, then decoded text); the current rows must then
        be text, whose positions continue after the text already in the cache.
        """
        dtype = self.embed_norm.weight.dtype
        parts = []
        batch = None
        if use_queries:
            batch = image.shape[0] if image is not None else input_ids.shape[0]
            parts.append(self.query_tokens.expand(batch, -1, -1))
        num_past = past[0][0].shape[2] if past else 0
        if input_ids is not None:
            if self.embeddings is None:
                raise ValueError("this Q-Former has no text side (a stage-2 checkpoint); text input is not possible")
            offset = max(num_past - self.config.num_query_tokens, 0)
            parts.append(self.embeddings(input_ids, position_offset=offset))
            batch = input_ids.shape[0]
            if text_mask is None:
                text_mask = torch.ones_like(input_ids)
        x = torch.cat([p.to(dtype) for p in parts], dim=1)
        x = self.embed_dropout(self.embed_norm(x))
        num_queries = self.config.num_query_tokens if use_queries else 0
        if image is not None:
            image = image.to(dtype)

        mode = MaskMode(mode)
        plain = not num_past and (
            input_ids is None
            or (bool(text_mask.all()) and (mode is MaskMode.BIDIRECTIONAL or not num_queries) and mode is not MaskMode.CAUSAL)
        )
        mask = None if plain else self_attention_mask(
            mode, num_queries, text_mask, num_past=num_past, batch_size=batch, device=x.device
        )
        cache: KVCache = []
        for i, layer in enumerate(self.layers):
            x, kv = layer(x, num_queries, mask, image, past[i] if past else None)
            cache.append(kv)
        return QFormerOutput(x, num_queries, cache if use_cache else None)

    def text_logits(self, text_states: torch.Tensor) -> torch.Tensor:
        """Vocabulary logits of text rows through the ITG head."""
        if self.lm_head is None:
            raise ValueError("this Q-Former has no language-model head")
        return self.lm_head(text_states)
