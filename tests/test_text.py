"""Condition encoders against independent implementations on identical random weights: transformers'
CLIPTextModel (SD 1.x), diffusers' OpenCLIP conversion into CLIPTextModel (SD 2.x), diffusers'
LDMBert conversion (LDM txt2img), sentence-transformers (MiniLM); tokenizers against transformers'
and tokenizers' own; plus the official key layouts."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from latentgen.errors import LatentgenError
from latentgen.models import text
from latentgen.models.text import (
    BERTEmbedder,
    ClassEmbedder,
    FrozenCLIPEmbedder,
    FrozenOpenCLIPEmbedder,
    MiniLMEmbedder,
)

TOLERANCE = 1e-4
PROMPTS = ["a photo of a cat", "An astronaut riding a horse on Mars, highly detailed, 4k!", ""]


def relative_error(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return ((ours - theirs).norm() / theirs.norm()).item()


def randomize(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Non-trivial weights everywhere (layer norms included) so every parameter matters."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.1 + (param.ndim == 1) * 0.5)
    return module.eval()


# ---- CLIP BPE --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_clip_tokenizer():
    vocab, ranks = text.clip_vocabulary()
    return CLIPTokenizer(vocab=vocab, merges=sorted(ranks, key=ranks.get))


def hf_ids(tokenizer, prompt: str) -> list[int]:
    return tokenizer([prompt], padding="max_length", max_length=77, truncation=True)["input_ids"][0]


def test_clip_vocabulary_is_openai_size_and_order():
    vocab, ranks = text.clip_vocabulary()
    assert len(vocab) == 49408 and len(ranks) == 48894
    assert vocab["<|startoftext|>"] == 49406 and vocab["<|endoftext|>"] == 49407
    assert vocab["!"] == 0 and vocab["a</w>"] == 320 and vocab["cat</w>"] == 2368


def test_known_sd_ids():
    tokens = FrozenCLIPEmbedder(config=dict(hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                                            num_attention_heads=1)).tokenize(["a photo of a cat"])
    assert tokens.shape == (1, 77) and tokens.dtype == torch.long
    assert tokens[0].tolist() == [49406, 320, 1125, 539, 320, 2368] + [49407] * 71  # SD 1.x pads with the end token


@pytest.mark.parametrize("prompt", [
    "a photo of a cat",
    "Hello, World!!! It's  a   TEST... (masterpiece:1.2), [best] {quality}",
    "don't you'll we'd they're I'm we've she's",
    "naïve café — Zürich, São Paulo; Ærøskøbing",
    "東京タワー 서울 Москва ελληνικά",
    "robot 🤖 with 🎨 paint\tand\nnew  lines",
    "3.14159 x² ½ 1,000,000 #hashtag @user",
    "<|endoftext|> inside <|startoftext|> text",
    "word " * 100,  # truncated: 75 words, then the end token
    "supercalifragilisticexpialidocious" * 10,
    "",
])
def test_clip_bpe_matches_transformers(hf_clip_tokenizer, prompt):
    assert text.clip_tokenize([prompt], pad_id=49407)[0].tolist() == hf_ids(hf_clip_tokenizer, prompt)


# Real-world alphabets; capital sigma is left out: Python lower-cases a word-final Σ to ς, as
# OpenAI's and open_clip's tokenizers do, while transformers' Rust one gives σ.
ALPHABET = st.characters(codec="utf-8", exclude_characters="Σ", categories=["L", "N", "P", "S", "Zs"],
                         max_codepoint=0x1F64F).filter(lambda c: ord(c) < 0x3100 or 0x4E00 <= ord(c) < 0xA000
                                                       or 0xAC00 <= ord(c) < 0xD7A4 or ord(c) >= 0x1F300)


@settings(max_examples=150, deadline=None)
@given(st.text(ALPHABET, max_size=40))
def test_clip_bpe_fuzz_matches_transformers(hf_clip_tokenizer, prompt):
    assert text.clip_tokenize([prompt], pad_id=49407)[0].tolist() == hf_ids(hf_clip_tokenizer, prompt)


def test_truncation_keeps_end_token():
    tokens = text.clip_tokenize(["cat " * 200, "dog"], pad_id=0)
    assert tokens.shape == (2, 77)
    assert tokens[0, -1] == 49407 and (tokens[0, 1:-1] == 2368).all()
    assert tokens[1, :3].tolist() == [49406, 1929, 49407] and (tokens[1, 3:] == 0).all()


def test_openclip_pads_with_zero_and_decodes_html():
    embedder = FrozenOpenCLIPEmbedder(width=8, layers=1, heads=1, embed_dim=8)
    tokens = embedder.tokenize(["salt &amp; pepper", "salt & pepper"])
    sd1 = text.clip_tokenize(["salt & pepper", "salt &amp; pepper"], pad_id=49407)
    assert (tokens[0] == tokens[1]).all() and (sd1[0] != sd1[1]).any()  # transformers keeps entities
    assert torch.equal(tokens[1, :5], sd1[0, :5]) and sd1[0, 4] == 49407 and (tokens[1, 5:] == 0).all()


def test_final_sigma_lowercases_like_python():
    assert text.clip_clean("ΟΔΟΣ") == "οδος"


# ---- SD 1.x CLIP -----------------------------------------------------------------------------

SMALL_CLIP = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4)


@pytest.fixture(scope="module")
def clip_pair():
    ours = randomize(FrozenCLIPEmbedder(config=SMALL_CLIP))
    theirs = CLIPTextModel(CLIPTextConfig(**SMALL_CLIP, hidden_act="quick_gelu")).eval()
    state = {k.removeprefix("transformer."): v for k, v in ours.state_dict().items()}
    if not any(k.startswith("text_model.") for k in theirs.state_dict()):  # transformers 5 dropped that level
        state = {k.removeprefix("text_model."): v for k, v in state.items()}
    missing, unexpected = theirs.load_state_dict(state, strict=False)
    assert not unexpected and all("position_ids" in k for k in missing)
    return ours, theirs


@pytest.mark.parametrize("layer,layer_idx", [("last", None), ("pooled", None), ("hidden", -2), ("hidden", 0)])
def test_clip_matches_transformers(clip_pair, layer, layer_idx):
    ours, theirs = clip_pair
    ours.layer, ours.layer_idx = layer, layer_idx
    with torch.no_grad():
        z = ours(PROMPTS)
        out = theirs(input_ids=ours.tokenize(PROMPTS), output_hidden_states=True)
    reference = {"last": out.last_hidden_state, "pooled": out.pooler_output[:, None],
                 "hidden": out.hidden_states[layer_idx] if layer_idx is not None else None}[layer]
    assert z.shape == reference.shape
    assert relative_error(z, reference) <= TOLERANCE


def test_clip_official_keys():
    with torch.device("meta"):
        ours = FrozenCLIPEmbedder()
        theirs = CLIPTextModel(CLIPTextConfig(**text.CLIP_VIT_L14))
    expected = {"transformer.text_model." + k.removeprefix("text_model."): v.shape
                for k, v in theirs.state_dict().items()}
    assert {k: v.shape for k, v in ours.state_dict().items()} == expected
    assert len(expected) == 196 and ours.context_dim == 768
    assert not any(p.requires_grad for p in ours.parameters())


def test_clip_rejects_unknown_layer():
    with pytest.raises(ValueError):
        FrozenCLIPEmbedder(layer="hidden")


# ---- SD 2.x OpenCLIP --------------------------------------------------------------------------


def diffusers_openclip(ours: FrozenOpenCLIPEmbedder, layers: int) -> CLIPTextModel:
    """Our weights through diffusers' single-file OpenCLIP conversion, into transformers' CLIPTextModel."""
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint

    tower = ours.model
    width = tower.ln_final.normalized_shape[0]
    config = CLIPTextConfig(vocab_size=tower.token_embedding.num_embeddings, hidden_size=width,
                            intermediate_size=4 * width, num_hidden_layers=layers,
                            num_attention_heads=tower.transformer.resblocks[0].attn.heads, hidden_act="gelu")
    with torch.device("meta"):
        model = CLIPTextModel(config)
    checkpoint = {"cond_stage_model." + k: v for k, v in ours.state_dict().items()}
    state = convert_open_clip_checkpoint(model, checkpoint)
    state = {k.removeprefix("text_model."): v for k, v in state.items() if not k.startswith("text_projection")}
    if any(k.startswith("text_model.") for k in model.state_dict()):
        state = {"text_model." + k: v for k, v in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    for module in model.modules():  # built on the meta device: give the position ids real values
        if getattr(module, "position_ids", None) is not None and module.position_ids.is_meta:
            module.position_ids = torch.arange(module.position_ids.shape[-1])[None]
    return model.eval()


def test_openclip_penultimate_matches_diffusers():
    ours = randomize(FrozenOpenCLIPEmbedder(width=64, layers=3, heads=4, embed_dim=32))
    theirs = diffusers_openclip(ours, layers=3)
    with torch.no_grad():
        z = ours(PROMPTS)
        out = theirs(input_ids=ours.tokenize(PROMPTS), output_hidden_states=True)
        reference = theirs.final_layer_norm(out.hidden_states[-2])
        ours.layer = "last"
        last = ours(PROMPTS)
    assert z.shape == (3, 77, 64)
    assert relative_error(z, reference) <= TOLERANCE
    assert relative_error(last, out.last_hidden_state) <= TOLERANCE


@pytest.mark.slow
def test_openclip_vit_h_matches_diffusers_sd2_text_encoder():
    """Full ViT-H/14 width: diffusers' SD 2.x text encoder has 23 layers (it drops block 23) and
    uses its last output, which must equal our penultimate one."""
    torch.manual_seed(0)
    ours = FrozenOpenCLIPEmbedder().eval()
    theirs = diffusers_openclip(ours, layers=23)
    prompts = PROMPTS[:2]
    with torch.no_grad():
        z = ours(prompts)
        reference = theirs(input_ids=ours.tokenize(prompts)).last_hidden_state
    assert z.shape == (2, 77, 1024)
    assert relative_error(z, reference) <= TOLERANCE


def test_openclip_official_keys():
    with torch.device("meta"):
        ours = FrozenOpenCLIPEmbedder()
    block = {"ln_1.weight": (1024,), "ln_1.bias": (1024,), "attn.in_proj_weight": (3072, 1024),
             "attn.in_proj_bias": (3072,), "attn.out_proj.weight": (1024, 1024), "attn.out_proj.bias": (1024,),
             "ln_2.weight": (1024,), "ln_2.bias": (1024,), "mlp.c_fc.weight": (4096, 1024),
             "mlp.c_fc.bias": (4096,), "mlp.c_proj.weight": (1024, 4096), "mlp.c_proj.bias": (1024,)}
    expected = {"model.token_embedding.weight": (49408, 1024), "model.positional_embedding": (77, 1024),
                "model.ln_final.weight": (1024,), "model.ln_final.bias": (1024,),
                "model.text_projection": (1024, 1024), "model.logit_scale": (),
                **{f"model.transformer.resblocks.{i}.{k}": v for i in range(24) for k, v in block.items()}}
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == expected
    assert ours.context_dim == 1024


# ---- LDM BERT ---------------------------------------------------------------------------------


def test_bert_tokenizer_is_bert_base_uncased():
    from tokenizers import BertWordPieceTokenizer

    ids = BERTEmbedder(n_embed=8, n_layer=1).tokenize(["A photo of a CAT", "Hello, world! " * 40])
    assert ids.shape == (2, 77)
    assert ids[0, :8].tolist() == [101, 1037, 6302, 1997, 1037, 4937, 102, 0]
    assert ids[1, :5].tolist() == [101, 7592, 1010, 2088, 999] and ids[1, -1] == 102
    oracle = BertWordPieceTokenizer(str(text.minilm_path() / "vocab.txt"), lowercase=True)
    for prompt in ["Naïve café, 東京!", "don't STOP", "a photo of a cat"]:
        assert text.bert_tokenize([prompt])[0, : len(oracle.encode(prompt).ids)].tolist() == \
            oracle.encode(prompt).ids


def test_bert_matches_diffusers_ldmbert():
    from diffusers.pipelines.latent_diffusion.pipeline_latent_diffusion import LDMBertConfig
    from diffusers.pipelines.stable_diffusion.convert_from_ckpt import convert_ldm_bert_checkpoint

    ours = randomize(BERTEmbedder(n_embed=64, n_layer=3))
    config = LDMBertConfig(d_model=64, encoder_layers=3, encoder_ffn_dim=256, dropout=0.0)
    theirs = convert_ldm_bert_checkpoint(ours, config).eval()
    with torch.no_grad():
        z = ours(PROMPTS)
        reference = theirs(input_ids=ours.tokenize(PROMPTS)).last_hidden_state
    assert z.shape == (3, 77, 64)
    assert relative_error(z, reference) <= TOLERANCE


def test_bert_official_keys():
    with torch.device("meta"):
        ours = BERTEmbedder()
    attention = {"0.weight": (1280,), "0.bias": (1280,), "1.to_q.weight": (512, 1280),
                 "1.to_k.weight": (512, 1280), "1.to_v.weight": (512, 1280), "1.to_out.weight": (1280, 512),
                 "1.to_out.bias": (1280,)}
    feed_forward = {"0.weight": (1280,), "0.bias": (1280,), "1.net.0.0.weight": (5120, 1280),
                    "1.net.0.0.bias": (5120,), "1.net.2.weight": (1280, 5120), "1.net.2.bias": (1280,)}
    expected = {f"transformer.attn_layers.layers.{i}.{k}": v for i in range(64)
                for k, v in (attention if i % 2 == 0 else feed_forward).items()}
    expected.update({"transformer.token_emb.weight": (30522, 1280), "transformer.pos_emb.emb.weight": (77, 1280),
                     "transformer.norm.weight": (1280,), "transformer.norm.bias": (1280,),
                     "transformer.to_logits.weight": (30522, 1280), "transformer.to_logits.bias": (30522,)})
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == expected
    assert ours.context_dim == 1280


# ---- class labels ---------------------------------------------------------------------------


def test_class_embedder():
    embedder = ClassEmbedder(embed_dim=16, n_classes=1001, key="class_label")
    ids = torch.tensor([3, 1000])
    z = embedder(ids)
    assert z.shape == (2, 1, 16)
    assert torch.equal(z[:, 0], embedder.embedding.weight[[3, 1000]])
    assert torch.equal(embedder({"class_label": ids}), z)
    assert list(embedder.state_dict()) == ["embedding.weight"]
    assert embedder.unconditional_class == 1000 and embedder.context_dim == 16
    assert ClassEmbedder(embed_dim=4).unconditional_class is None


def test_class_embedder_rejects_unknown_class():
    with pytest.raises(LatentgenError, match="0..999"):
        ClassEmbedder(embed_dim=4)(torch.tensor([1000]))


# ---- MiniLM ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_minilm_matches_sentence_transformers():
    from sentence_transformers import SentenceTransformer

    embedder = MiniLMEmbedder()
    z = embedder(PROMPTS)
    assert z.shape == (3, 77, 384) and embedder.context_dim == 384
    assert embedder.state_dict() == {} and not list(embedder.parameters())
    oracle = SentenceTransformer(str(text.minilm_path()), device="cpu", local_files_only=True)
    tokens = oracle.encode(PROMPTS, output_value="token_embeddings", convert_to_tensor=False)
    for row, reference in zip(z, tokens):
        assert relative_error(row[: len(reference)], reference.float()) <= TOLERANCE
    double = MiniLMEmbedder().to(torch.float64)
    assert double(PROMPTS[:1]).dtype == torch.float64
    assert text._minilm_on_cpu.cache_info().misses == 1  # read from disk once per process


def test_minilm_matches_transformers_bert_on_every_row_and_tokenizes_alike():
    """Our BertModel against transformers' on the package's weights, padding rows included (the
    UNet's cross-attention sees all 77), and the `tokenizers` WordPiece against transformers'."""
    from transformers import AutoModel, AutoTokenizer

    texts = [*PROMPTS, "A Café in Zürich — naïve façade", "日本語 🍕 pizza!!", "x " * 300, "", "don't  stop\tme"]
    oracle_tokenizer = AutoTokenizer.from_pretrained(str(text.minilm_path()), local_files_only=True)
    for prompt in texts:
        assert text.wordpiece_ids(prompt) == oracle_tokenizer(prompt, add_special_tokens=False)["input_ids"], prompt
    embedder = MiniLMEmbedder()
    tokens = embedder.tokenize(texts)
    oracle = AutoModel.from_pretrained(str(text.minilm_path()), local_files_only=True).eval()
    with torch.no_grad():
        reference = oracle(input_ids=tokens, attention_mask=(tokens != embedder.frame.pad).long()).last_hidden_state
    torch.testing.assert_close(embedder.encode_tokens(tokens), reference, rtol=1e-4, atol=1e-4)


def test_minilm_prompts_are_encoded_without_importing_transformers():
    """transformers' import costs a cold `latentgen txt2img` seconds on a 2-core CPU."""
    import subprocess
    import sys

    code = ("import sys\nfrom latentgen.models.text import MiniLMEmbedder\nMiniLMEmbedder()(['a red heart'])\n"
            "assert 'transformers' not in sys.modules, 'transformers was imported'\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
