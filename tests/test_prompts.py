"""AUTOMATIC1111 prompt syntax: its documented parse examples, windows of 75 tokens, and the
weighting of the context checked by hand."""

import pytest
import torch

from latentgen import prompts
from latentgen.models.text import FrozenCLIPEmbedder, TokenFrame

# The examples in the docstring of AUTOMATIC1111's `prompt_parser.parse_prompt_attention`.
A1111_EXAMPLES = [
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
     [("a ", 1.0), ("house", 1.5730000000000004), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55),
      (", sun, ", 1.1), ("sky", 1.4641000000000006), (".", 1.1)]),
]


@pytest.mark.parametrize("prompt, expected", A1111_EXAMPLES)
def test_parse_matches_automatic1111s_documented_examples(prompt, expected):
    assert prompts.parse_attention(prompt) == expected


def test_parse_square_brackets_break_and_empty():
    assert prompts.parse_attention("[faint] ((strong))") == [("faint", 1 / 1.1), (" ", 1.0), ("strong", 1.1 * 1.1)]
    assert prompts.parse_attention("a cat BREAK a dog") == [("a cat", 1.0), ("BREAK", -1.0), ("a dog", 1.0)]
    assert prompts.parse_attention("") == [("", 1.0)]


class Words:
    """A toy encoder: a word is its number, the context row of token t is [t, 1]; windows of 4 tokens."""

    frame = TokenFrame(start=1, end=2, pad=0, length=6)

    def token_ids(self, text: str) -> list[int]:
        return [3 if word == "," else int(word) for word in text.replace(",", " , ").split()]

    def encode_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        return torch.stack([tokens.double(), torch.ones_like(tokens, dtype=torch.float64)], -1)


def test_weights_scale_the_rows_then_restore_the_mean_by_hand():
    z = prompts.encode(Words(), ["(10:2) 11"])[0]
    rows = torch.tensor([[1, 1], [20, 2], [11, 1], [2, 1], [0, 1], [0, 1]], dtype=torch.float64)
    original_mean, scaled_mean = 30 / 12, 41 / 12  # [1, 10, 11, 2, 0, 0] and six ones; then 10 -> 20, 1 -> 2
    torch.testing.assert_close(z, rows * original_mean / scaled_mean, rtol=0, atol=1e-12)
    assert torch.equal(prompts.encode(Words(), ["10 11"])[0], Words().encode_tokens(Words().frame.rows([[10, 11]]))[0])


def test_long_prompts_go_in_windows_with_comma_backtrack_and_break():
    encoder = Words()
    assert [w.ids for w in prompts.windows(encoder, "10 11 12 13 14 15")] == [[10, 11, 12, 13], [14, 15]]
    assert [w.ids for w in prompts.windows(encoder, "10 11, 12 13 14")] == [[10, 11, 3], [12, 13, 14]]
    assert [w.ids for w in prompts.windows(encoder, "10 BREAK 11")] == [[10], [11]]
    z = prompts.encode(encoder, ["10 11 12 13 14", "10"])
    assert z.shape == (2, 12, 2)  # two windows each; the short prompt padded with the empty window
    torch.testing.assert_close(z[1, 6:], prompts.encode(encoder, [""])[0])


@pytest.fixture(scope="module")
def clip():
    torch.manual_seed(0)
    encoder = FrozenCLIPEmbedder({"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                                  "num_attention_heads": 2}).eval()
    for parameter in encoder.parameters():
        parameter.data.normal_(0, 0.05)
    return encoder


def test_plain_prompts_encode_exactly_as_the_encoder_alone(clip):
    texts = ["a red heart", "", "a photo of a cat, highly detailed"]
    assert torch.equal(prompts.encode(clip, texts), clip(texts))


def test_prompts_over_75_tokens_are_not_cut(clip):
    long = ", ".join(["a red heart"] * 30)  # 119 CLIP tokens
    z = prompts.encode(clip, [long])
    assert z.shape[1] == 2 * 77
    first = prompts.windows(clip, long)[0]
    torch.testing.assert_close(z[0, :77], clip.encode_tokens(clip.frame.rows([first.ids]))[0])
    assert first.ids[-1] == clip.token_ids(",")[0]  # the window ends on a comma, not mid-phrase
    weighted = prompts.encode(clip, ["a (red:1.5) heart"])
    assert not torch.equal(weighted, clip(["a red heart"]))
    assert weighted.mean().item() == pytest.approx(clip(["a red heart"]).mean().item(), rel=1e-5)
