"""AUTOMATIC1111's prompt syntax, the de-facto standard: attention weights, BREAK, 75-token chunks.

- `(word)` multiplies the attention to `word` by 1.1, `((word))` by 1.21, `(word:1.3)` by 1.3,
  `[word]` divides it by 1.1; `\\(` `\\)` `\\[` `\\]` are literal brackets; unbalanced brackets
  close at the end of the prompt.
- The tokens go in windows of 75 (the encoder's 77 less start and end token), each encoded on its
  own and the contexts concatenated along the sequence, so a long prompt is not cut. A window
  that fills up moves the words after its last comma (if within 20 tokens) to the next one;
  `BREAK` starts a new window.
- Each token's context row is scaled by its weight, then the whole context rescaled to its
  original mean (A1111's `EmphasisOriginal`), per prompt and window.
- A textual-inversion embedding's name (the encoder's `embeddings`, addons.load_embeddings) stands
  for its n vectors, which replace n token embeddings and never straddle two windows.

A prompt with no syntax and at most 75 tokens encodes exactly as the encoder alone would.
"""

import re
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from .errors import LatentgenError
from .models.text import TextEncoder

ROUND, SQUARE = 1.1, 1 / 1.1
COMMA_BACKTRACK = 20  # A1111's default "comma_padding_backtrack"
BREAK = "BREAK"
TOKEN = re.compile(r"\\\(|\\\)|\\\[|\\]|\\\\|\\|\(|\[|:\s*([+-]?[.\d]+)\s*\)|\)|]|[^\\()\[\]:]+|:")
BREAK_WORD = re.compile(r"\s*\bBREAK\b\s*")
EXTRA_NETWORK = re.compile(r"<(\w+):([^>:]+)(?::([^>]*))?>")  # A1111's <lora:name:weight>


def extra_networks(prompt: str) -> tuple[str, list[tuple[str, str, float]]]:
    """(the prompt without its `<kind:name[:weight]>` tags, [(kind, name, weight)]), as A1111 reads them."""
    found = []
    for kind, name, weight in EXTRA_NETWORK.findall(prompt):
        try:
            found.append((kind, name, float(weight) if weight else 1.0))
        except ValueError:
            raise LatentgenError(f"<{kind}:{name}:{weight}>: the weight must be a number") from None
    return EXTRA_NETWORK.sub("", prompt), found


def parse_attention(prompt: str) -> list[tuple[str, float]]:
    """(text, weight) runs of a prompt, neighbours of equal weight merged; BREAK as (BREAK, -1).
    `<lora:...>` tags are not text: they are dropped here (see `extra_networks`)."""
    prompt = extra_networks(prompt)[0]
    runs: list[list] = []
    round_open: list[int] = []
    square_open: list[int] = []

    def multiply(start: int, factor: float) -> None:
        for run in runs[start:]:
            run[1] *= factor

    for match in TOKEN.finditer(prompt):
        text, weight = match.group(0), match.group(1)
        if text.startswith("\\"):
            runs.append([text[1:], 1.0])
        elif text == "(":
            round_open.append(len(runs))
        elif text == "[":
            square_open.append(len(runs))
        elif weight is not None and round_open:
            multiply(round_open.pop(), float(weight))
        elif text == ")" and round_open:
            multiply(round_open.pop(), ROUND)
        elif text == "]" and square_open:
            multiply(square_open.pop(), SQUARE)
        else:
            for i, part in enumerate(BREAK_WORD.split(text)):
                if i:
                    runs.append([BREAK, -1.0])
                runs.append([part, 1.0])
    for start in round_open:
        multiply(start, ROUND)
    for start in square_open:
        multiply(start, SQUARE)
    merged: list[list] = []
    for run in runs or [["", 1.0]]:
        if merged and merged[-1][1] == run[1] and run[1] != -1:
            merged[-1][0] += run[0]
        else:
            merged.append(run)
    return [(text, weight) for text, weight in merged]


@dataclass
class Window:
    """Up to `capacity` tokens of one prompt and their weights; `vectors` replace the input
    embeddings of some of them (textual inversion: position in `ids` -> vector)."""

    ids: list[int] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)
    vectors: dict[int, torch.Tensor] = field(default_factory=dict)

    def cut(self, at: int) -> tuple["Window", "Window"]:
        head = {i: v for i, v in self.vectors.items() if i < at}
        tail = {i - at: v for i, v in self.vectors.items() if i >= at}
        return Window(self.ids[:at], self.weights[:at], head), Window(self.ids[at:], self.weights[at:], tail)


def _pieces(encoder: TextEncoder, text: str) -> list[tuple[list[int], Optional[torch.Tensor]]]:
    """The text's tokens, one piece per word run, with a textual-inversion embedding's name as one
    piece of its n vectors (`encoder.embeddings`: name -> [n, D], set by addons.load_embeddings)."""
    embeddings = getattr(encoder, "embeddings", None) or {}
    if not embeddings:
        return [(encoder.token_ids(text), None)]
    names = "|".join(re.escape(name) for name in sorted(embeddings, key=len, reverse=True))
    pieces = []
    for i, part in enumerate(re.split(rf"(?<![\w-])({names})(?![\w-])", text)):
        if i % 2:
            vectors = embeddings[part]
            pieces.append(([encoder.frame.end] * len(vectors), vectors))
        elif part:
            pieces.append((encoder.token_ids(part), None))
    return pieces


def windows(encoder: TextEncoder, prompt: str) -> list[Window]:
    """The prompt's tokens in windows of the encoder's capacity (see the module docstring)."""
    capacity = encoder.frame.capacity
    comma = encoder.token_ids(",")
    comma_id = comma[0] if len(comma) == 1 else None
    done: list[Window] = []
    current, last_comma = Window(), -1
    for text, weight in parse_attention(prompt):
        if weight == -1:  # BREAK
            done.append(current)
            current, last_comma = Window(), -1
            continue
        for ids, vectors in _pieces(encoder, text):
            if vectors is not None:  # an embedding stays in one window
                if len(vectors) > capacity:
                    raise LatentgenError(f"an embedding of {len(vectors)} vectors does not fit a {capacity}-token window")
                if len(current.ids) + len(vectors) > capacity:
                    done.append(current)
                    current, last_comma = Window(), -1
                current.vectors.update({len(current.ids) + i: vector for i, vector in enumerate(vectors)})
                current.ids.extend(ids)
                current.weights.extend([weight] * len(ids))
                continue
            for token in ids:
                if len(current.ids) == capacity:
                    full = 0 <= last_comma and len(current.ids) - last_comma <= COMMA_BACKTRACK
                    head, current = current.cut(last_comma + 1 if full else capacity)
                    done.append(head)
                    last_comma = -1
                if token == comma_id:
                    last_comma = len(current.ids)
                current.ids.append(token)
                current.weights.append(weight)
    if current.ids or not done:
        done.append(current)
    return done


def _encode_window(encoder: TextEncoder, window: Window) -> torch.Tensor:
    rows = encoder.frame.rows([window.ids])
    if window.vectors:  # after the start token
        z = encoder.encode_tokens(rows, [{1 + i: v for i, v in window.vectors.items()}])[0]
    else:
        z = encoder.encode_tokens(rows)[0]
    if all(weight == 1.0 for weight in window.weights):
        return z
    weights = torch.ones(len(z), dtype=z.dtype, device=z.device)
    weights[1 : 1 + len(window.weights)] = torch.tensor(window.weights, dtype=z.dtype)
    precise = torch.promote_types(z.dtype, torch.float32)  # half-precision means drift
    original = z.to(precise).mean()
    z = z * weights[:, None]
    return z * (original / z.to(precise).mean()).to(z.dtype)


def encode(encoder: TextEncoder, prompts: Sequence[str], chunks: int = 1) -> torch.Tensor:
    """Contexts [B, n * frame length, D] of `prompts`, with n the most windows any prompt needs
    (at least `chunks`); shorter prompts are padded with windows of the empty text, as A1111 does."""
    per_prompt = [windows(encoder, prompt) for prompt in prompts]
    count = max(chunks, *(len(w) for w in per_prompt))
    empty = None
    rows = []
    for prompt_windows in per_prompt:
        parts = [_encode_window(encoder, window) for window in prompt_windows]
        if len(parts) < count:
            empty = _encode_window(encoder, Window()) if empty is None else empty
            parts += [empty] * (count - len(parts))
        rows.append(torch.cat(parts))
    return torch.stack(rows)


def window_count(encoder: TextEncoder, prompt: str) -> int:
    return len(windows(encoder, prompt))


def supports(encoder: object) -> bool:
    """Whether `encoder` takes prompts (our text encoders do; class embedders do not)."""
    return isinstance(encoder, TextEncoder)
