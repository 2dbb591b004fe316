"""Checkpoint reading (safetensors, weights-only pickles), refusal of unsafe or broken files,
hashing, conversion, and load_model round trips in the official key layout."""

import argparse
import hashlib
import json
import os
import struct
import sys
import types

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from latentgen.errors import LatentgenError
from latentgen.loader import (
    convert_checkpoint, ema_key, file_sha256, load_model, load_state_dict, read_checkpoint,
    read_safetensors_header,
)
from latentgen.models.autoencoder import AutoencoderKL, VQModel
from latentgen.schedules import make_alphas_cumprod

TINY_DD = dict(double_z=True, z_channels=4, resolution=32, in_channels=3, out_ch=3, ch=32, ch_mult=[1, 2],
               num_res_blocks=1, attn_resolutions=[], dropout=0.0)


@pytest.fixture
def fake_lightning(monkeypatch):
    """A stand-in `pytorch_lightning.callbacks.model_checkpoint` so tests can pickle the global
    that real SD 1.x checkpoints name, without Lightning installed."""
    module = types.ModuleType("pytorch_lightning.callbacks.model_checkpoint")

    class ModelCheckpoint:
        def __init__(self, *args):
            self.args = args

    ModelCheckpoint.__module__, ModelCheckpoint.__qualname__ = module.__name__, "ModelCheckpoint"
    module.ModelCheckpoint = ModelCheckpoint
    for name in ("pytorch_lightning", "pytorch_lightning.callbacks"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, module.__name__, module)
    return ModelCheckpoint


def lightning_checkpoint(state_dict, model_checkpoint):
    """The non-weight entries an official SD 1.x / LDM .ckpt carries next to its state_dict."""
    return {
        "state_dict": state_dict, "global_step": 3, "epoch": 1, "pytorch-lightning_version": "1.4.2",
        "callbacks": {model_checkpoint: {"best_model_score": np.float64(0.25), "monitor": "val/loss",
                                         "scores": np.arange(3, dtype=np.float32), "step": np.int64(7)}},
    }


def sample_tensors():
    torch.manual_seed(0)
    return {"w": torch.randn(4, 3), "b": torch.arange(5), "h": torch.randn(2, 2).half()}


def assert_same_tensors(got, want):
    assert set(got) == set(want)
    for key in want:
        assert got[key].dtype == want[key].dtype
        assert torch.equal(got[key], want[key])


# ---- reading --------------------------------------------------------------------------------


def test_reads_official_style_lightning_ckpt_with_allowed_globals(tmp_path, fake_lightning):
    tensors = sample_tensors()
    path = tmp_path / "model.ckpt"
    torch.save(lightning_checkpoint(tensors, fake_lightning), path)
    assert_same_tensors(load_state_dict(path), tensors)


def test_unwraps_nested_state_dict_and_plain_state_dicts(tmp_path):
    tensors = sample_tensors()
    torch.save({"state_dict": {"state_dict": tensors}}, tmp_path / "nested.pt")
    torch.save(tensors, tmp_path / "plain.pth")
    assert_same_tensors(load_state_dict(tmp_path / "nested.pt"), tensors)
    assert_same_tensors(load_state_dict(tmp_path / "plain.pth"), tensors)


def test_reads_safetensors_and_metadata(tmp_path):
    tensors = sample_tensors()
    save_file(tensors, tmp_path / "m.safetensors", metadata={"modelspec.prediction_type": "v"})
    state, metadata = read_checkpoint(tmp_path / "m.safetensors")
    assert_same_tensors(state, tensors)
    assert metadata == {"modelspec.prediction_type": "v"}


def test_malicious_pickle_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    class EvilOpen:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    for i, payload in enumerate([Evil(), EvilOpen()]):
        path = tmp_path / f"evil{i}.ckpt"
        torch.save({"state_dict": {"w": torch.zeros(2)}, "hparams": payload}, path)
        with pytest.raises(LatentgenError, match="refused.*latentgen convert --trust") as error:
            load_state_dict(path)
        assert "\n" not in str(error.value)
        assert not marker.exists()


def test_allowlisted_lightning_name_is_inert_even_when_called(tmp_path, fake_lightning):
    """A pickle may call the allowlisted ModelCheckpoint name with arguments: it builds an inert stand-in."""

    class Sneaky:
        def __reduce__(self):
            return (fake_lightning, ("rm -rf /",))

    path = tmp_path / "sneaky.ckpt"
    torch.save({"state_dict": {"w": torch.ones(2)}, "callbacks": Sneaky()}, path)
    assert torch.equal(load_state_dict(path)["w"], torch.ones(2))


@pytest.mark.parametrize("builder, message", [
    (lambda p: None, "does not exist"),
    (lambda p: p.write_bytes(b""), "empty"),
    (lambda p: p.mkdir(), "is a folder"),
    (lambda p: p.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(100)), "is a PNG image"),
    (lambda p: p.write_bytes(b"just some text, not a checkpoint"), "not a PyTorch zip checkpoint"),
])
def test_broken_pickle_files_give_one_line(tmp_path, builder, message):
    path = tmp_path / "model.ckpt"
    builder(path)
    with pytest.raises(LatentgenError, match=message) as error:
        load_state_dict(path)
    assert "\n" not in str(error.value)


def test_truncated_and_legacy_pickles_are_refused(tmp_path):
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": sample_tensors()}, path)
    data = path.read_bytes()
    for cut in (len(data) // 2, len(data) - 30, 100):
        path.write_bytes(data[:cut])
        with pytest.raises(LatentgenError):
            load_state_dict(path)
    torch.save(sample_tensors(), path, _use_new_zipfile_serialization=False)
    with pytest.raises(LatentgenError, match="pre-1.6"):
        load_state_dict(path)


def test_unknown_suffix_and_non_dict(tmp_path):
    (tmp_path / "m.onnx").write_bytes(b"\x08\x07" * 20)
    with pytest.raises(LatentgenError, match="unknown checkpoint type"):
        load_state_dict(tmp_path / "m.onnx")
    torch.save([torch.zeros(1)], tmp_path / "list.pt")
    with pytest.raises(LatentgenError, match="holds a list"):
        load_state_dict(tmp_path / "list.pt")
    torch.save({"step": 3}, tmp_path / "empty.pt")
    with pytest.raises(LatentgenError, match="no tensors"):
        load_state_dict(tmp_path / "empty.pt")


def safetensors_bytes(header: dict, data: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


@pytest.mark.parametrize("header, data, message", [
    ({"w": {"dtype": "F32", "shape": [100000, 100000], "data_offsets": [0, 40_000_000_000]}}, bytes(16), "outside"),
    ({"w": {"dtype": "F32", "shape": [100000, 100000], "data_offsets": [0, 16]}}, bytes(16), "spans 16 bytes"),
    ({"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [8, 24]}}, bytes(16), "outside"),
    ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
      "v": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, bytes(16), "overlap"),
    ({"w": {"dtype": "X99", "shape": [2], "data_offsets": [0, 8]}}, bytes(8), "unknown dtype"),
    ({"w": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, bytes(8), "malformed shape"),
    ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0]}}, bytes(8), "malformed data offsets"),
    ({"w": [1, 2]}, bytes(8), "malformed header entry"),
    ({"__metadata__": [1]}, b"", "__metadata__"),
])
def test_lying_safetensors_headers_are_refused_before_allocation(tmp_path, header, data, message):
    path = tmp_path / "lie.safetensors"
    path.write_bytes(safetensors_bytes(header, data))
    with pytest.raises(LatentgenError, match=message):
        read_safetensors_header(path)
    with pytest.raises(LatentgenError, match=message):
        load_state_dict(path)


def test_safetensors_header_length_and_json_are_checked(tmp_path):
    path = tmp_path / "m.safetensors"
    path.write_bytes(struct.pack("<Q", 10**12) + b"{}")
    with pytest.raises(LatentgenError, match="header length"):
        load_state_dict(path)
    path.write_bytes(struct.pack("<Q", 4) + b"{{{{")
    with pytest.raises(LatentgenError, match="not JSON"):
        load_state_dict(path)
    path.write_bytes(b"\x01\x02")
    with pytest.raises(LatentgenError, match="truncated"):
        load_state_dict(path)
    good = tmp_path / "good.safetensors"
    save_file(sample_tensors(), good)
    path.write_bytes(good.read_bytes()[:-5])
    with pytest.raises(LatentgenError, match="outside"):
        load_state_dict(path)


# ---- hashing and conversion -----------------------------------------------------------------


def test_file_sha256_matches_hashlib_and_is_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("LATENTGEN_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "m.safetensors"
    path.write_bytes(b"abc" * 1000)
    want = hashlib.sha256(path.read_bytes()).hexdigest()
    assert file_sha256(path) == want
    cache_file = tmp_path / "cache" / "hashes.json"
    cache = json.loads(cache_file.read_text())
    cache[str(path.resolve())]["sha256"] = "cached"
    cache_file.write_text(json.dumps(cache))
    assert file_sha256(path) == "cached"  # same size and mtime: the cache answers
    path.write_bytes(b"abcd" * 1000)
    assert file_sha256(path) == hashlib.sha256(path.read_bytes()).hexdigest()


def test_convert_clones_shared_tensors_and_halves(tmp_path, fake_lightning):
    base = torch.randn(4, 4)
    state = {"a": base, "a_view": base[1:], "same": base, "ids": torch.arange(3)}
    src = tmp_path / "in.ckpt"
    torch.save(lightning_checkpoint(state, fake_lightning), src)
    out = convert_checkpoint(src, tmp_path / "out.safetensors", half=True)
    got, metadata = read_checkpoint(out)
    assert got["a"].dtype == torch.float16 and got["ids"].dtype == torch.int64
    assert torch.equal(got["a_view"], base[1:].half())
    assert torch.equal(got["same"], base.half())
    assert metadata["converted_from"] == "in.ckpt"
    with pytest.raises(LatentgenError, match="must end in .safetensors"):
        convert_checkpoint(src, tmp_path / "out.ckpt")


def test_convert_trust_unpickles_what_weights_only_refuses(tmp_path):
    src = tmp_path / "hparams.ckpt"
    torch.save({"state_dict": {"w": torch.ones(3)}, "hparams": argparse.Namespace(lr=1e-4)}, src)
    with pytest.raises(LatentgenError, match="argparse.Namespace"):
        convert_checkpoint(src, tmp_path / "out.safetensors")
    out = convert_checkpoint(src, tmp_path / "out.safetensors", trust=True)
    assert torch.equal(load_state_dict(out)["w"], torch.ones(3))


# ---- load_model: standalone autoencoders ----------------------------------------------------


def tiny_autoencoder(kind: str) -> torch.nn.Module:
    torch.manual_seed(1)
    if kind == "kl":
        return AutoencoderKL(TINY_DD, embed_dim=4).eval()
    return VQModel({**TINY_DD, "double_z": False, "attn_resolutions": [16]}, n_embed=16, embed_dim=3).eval()


@pytest.mark.parametrize("kind", ["kl", "vq"])
def test_standalone_autoencoder_round_trip(tmp_path, kind, fake_lightning, monkeypatch):
    monkeypatch.setenv("LATENTGEN_CACHE", str(tmp_path / "cache"))
    reference = tiny_autoencoder(kind)
    state = {**reference.state_dict(), "loss.discriminator.main.0.weight": torch.zeros(2), "loss.logvar": torch.zeros(())}
    torch.save(lightning_checkpoint(state, fake_lightning), tmp_path / "ae.ckpt")
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        want = reference.decode(reference.encode(x))
        for path in (tmp_path / "ae.ckpt", convert_checkpoint(tmp_path / "ae.ckpt", tmp_path / "ae.safetensors")):
            model = load_model(path)
            assert model.unet is None and model.cond_stage is None and model.scale_factor == 1.0
            assert model.family == f"autoencoder-{kind}" and model.name == "ae"
            assert model.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
            assert torch.equal(model.first_stage.decode(model.first_stage.encode(x)), want)


def test_key_mismatches_are_one_line_with_counts(tmp_path):
    state = tiny_autoencoder("kl").state_dict()
    state.pop("decoder.conv_out.bias")
    state["decoder.extra.weight"] = torch.zeros(1)
    state["encoder.conv_in.bias"] = torch.zeros(7)
    torch.save(state, tmp_path / "bad.ckpt")
    with pytest.raises(LatentgenError) as error:
        load_model(tmp_path / "bad.ckpt")
    message = str(error.value)
    assert "\n" not in message
    assert "1 unexpected key (first: 'decoder.extra.weight')" in message
    assert "1 missing (first: 'decoder.conv_out.bias')" in message
    assert "'encoder.conv_in.bias' is [7], the model wants [32]" in message


# ---- load_model: full LDM checkpoints -------------------------------------------------------

TINY_UNET = dict(image_size=8, in_channels=4, out_channels=4, model_channels=32, attention_resolutions=[2],
                 num_res_blocks=1, channel_mult=[1, 2], num_head_channels=32, use_spatial_transformer=True,
                 transformer_depth=1, context_dim=32)
SCHEDULE_BUFFERS = ("betas", "alphas_cumprod", "alphas_cumprod_prev", "posterior_variance", "logvar")


def tiny_ldm():
    """(unet, autoencoder, class embedder) of a tiny class-conditional LDM, seeded."""
    from latentgen.models.text import ClassEmbedder
    from latentgen.models.unet import UNetModel

    torch.manual_seed(2)
    return UNetModel(**TINY_UNET).eval(), tiny_autoencoder("kl"), ClassEmbedder(32, n_classes=10).eval()


def official_layout(unet, first_stage, cond_stage, ema_offset=None) -> dict:
    """A state dict as CompVis LatentDiffusion.state_dict() writes it, schedule buffers and EMA included."""
    state = {}
    for prefix, module in (("model.diffusion_model.", unet), ("first_stage_model.", first_stage), ("cond_stage_model.", cond_stage)):
        state.update({prefix + k: v for k, v in module.state_dict().items()})
    state.update({name: torch.rand(1000, dtype=torch.float64) for name in SCHEDULE_BUFFERS})
    state["scale_factor"] = torch.tensor(0.5)
    if ema_offset is not None:
        state.update({ema_key(k): v + ema_offset for k, v in unet.state_dict().items()})
        state.update({"model_ema.decay": torch.tensor(0.9999), "model_ema.num_updates": torch.tensor(3)})
    return state


def outputs(unet, first_stage, cond_stage):
    """UNet prediction and decoded image on fixed inputs: what must survive a save/load round trip."""
    torch.manual_seed(3)
    x, t, labels = torch.randn(2, 4, 8, 8), torch.tensor([10.0, 900.0]), torch.tensor([1, 7])
    with torch.no_grad():
        return unet(x, t, context=cond_stage(labels)), first_stage.decode(x)


@pytest.mark.parametrize("suffix", [".ckpt", ".safetensors"])
def test_full_checkpoint_round_trip(tmp_path, suffix, fake_lightning, monkeypatch):
    monkeypatch.setenv("LATENTGEN_CACHE", str(tmp_path / "cache"))
    unet, first_stage, cond_stage = tiny_ldm()
    state = official_layout(unet, first_stage, cond_stage)
    path = tmp_path / f"tiny{suffix}"
    if suffix == ".ckpt":
        torch.save(lightning_checkpoint(state, fake_lightning), path)
    else:
        save_file(state, path)
    model = load_model(path)
    assert (model.family, model.spec.conditioning, model.parameterization) == ("ldm-class", "class", "eps")
    assert model.scale_factor == 0.5  # the checkpoint's own scale_factor buffer wins over the family default
    assert model.params["unet_config"]["params"] == {**TINY_UNET, "image_size": 128}  # 256 px / f=2
    for got, want in zip(outputs(model.unet, model.first_stage, model.cond_stage), outputs(unet, first_stage, cond_stage)):
        assert torch.equal(got, want)
    assert (model.spec.schedule.linear_start, model.spec.schedule.linear_end) == (0.0015, 0.0155)  # LDM KL schedule
    assert torch.equal(model.alphas_cumprod, make_alphas_cumprod("linear", 1000, 0.0015, 0.0155))


def test_ema_weights_are_substituted_when_asked(tmp_path):
    unet, first_stage, cond_stage = tiny_ldm()
    path = tmp_path / "ema.safetensors"
    save_file(official_layout(unet, first_stage, cond_stage, ema_offset=0.01), path)
    plain, ema = load_model(path, use_ema=False), load_model(path)
    key = "input_blocks.0.0.weight"
    assert torch.equal(plain.unet.state_dict()[key], unet.state_dict()[key])
    assert torch.equal(ema.unet.state_dict()[key], unet.state_dict()[key] + 0.01)
    assert all(torch.equal(ema.unet.state_dict()[k], v + 0.01) for k, v in unet.state_dict().items())


def test_unet_mismatches_name_the_full_checkpoint_key(tmp_path):
    unet, first_stage, cond_stage = tiny_ldm()
    state = official_layout(unet, first_stage, cond_stage)
    state.pop("model.diffusion_model.out.2.bias")
    state["model.diffusion_model.bogus.weight"] = torch.zeros(1)
    state["something_else"] = torch.zeros(1)
    save_file(state, tmp_path / "bad.safetensors")
    with pytest.raises(LatentgenError) as error:
        load_model(tmp_path / "bad.safetensors")
    message = str(error.value)
    assert "checkpoint does not fit the UNet" in message and "\n" not in message
    assert "2 unexpected keys (first: 'model.diffusion_model.bogus.weight')" in message
    assert "1 missing (first: 'model.diffusion_model.out.2.bias')" in message


def test_model_folder_with_partial_config_json(tmp_path):
    """Our bundled layout: model.safetensors + config.json that only says what detection cannot know."""
    unet, first_stage, cond_stage = tiny_ldm()
    folder = tmp_path / "tiny-model"
    folder.mkdir()
    save_file(official_layout(unet, first_stage, cond_stage), folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps({"parameterization": "v", "scale_factor": 0.25, "linear_end": 0.012}))
    model = load_model(folder)
    assert (model.name, model.parameterization, model.scale_factor) == ("tiny-model", "v", 0.25)
    assert model.spec.schedule.linear_end == 0.012
    assert load_model(folder, prediction="eps").parameterization == "eps"


def test_complete_config_is_read_as_compvis_reads_it(tmp_path, monkeypatch):
    unet, first_stage, cond_stage = tiny_ldm()
    path = tmp_path / "tiny.safetensors"
    save_file(official_layout(unet, first_stage, cond_stage), path)
    config = {"model": {"target": "ldm.models.diffusion.ddpm.LatentDiffusion", "params": {
        "conditioning_key": "crossattn", "monitor": "val/loss",
        "unet_config": {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel", "params": TINY_UNET},
        "first_stage_config": {"target": "ldm.models.autoencoder.AutoencoderKL",
                               "params": {"embed_dim": 4, "ddconfig": TINY_DD, "lossconfig": {"target": "torch.nn.Identity"}}},
        "cond_stage_config": {"target": "ldm.modules.encoders.modules.ClassEmbedder",
                              "params": {"embed_dim": 32, "n_classes": 10, "key": "class_label"}},
    }}}
    (tmp_path / "tiny.json").write_text(json.dumps(config))
    model = load_model(path, config=tmp_path / "tiny.json")
    assert model.scale_factor == 1.0 and model.spec.schedule.linear_start == 1e-4  # CompVis defaults, as in a YAML
    for got, want in zip(outputs(model.unet, model.first_stage, model.cond_stage), outputs(unet, first_stage, cond_stage)):
        assert torch.equal(got, want)
    (tmp_path / "tiny.yaml").write_text("model: {params: {}}\n")
    monkeypatch.setitem(sys.modules, "yaml", None)
    with pytest.raises(LatentgenError, match="needs PyYAML"):
        load_model(path, config=tmp_path / "tiny.yaml")


def test_sibling_yaml_of_a_lone_autoencoder_is_used(tmp_path):
    """AUTOMATIC1111's convention: `name.yaml` beside `name.ckpt` is its config."""
    pytest.importorskip("yaml")
    reference = tiny_autoencoder("vq")
    torch.save(reference.state_dict(), tmp_path / "vq.ckpt")
    ddconfig = {**TINY_DD, "double_z": False, "attn_resolutions": [16], "resolution": 32}
    (tmp_path / "vq.yaml").write_text(json.dumps({"model": {"target": "ldm.models.autoencoder.VQModel", "params": {
        "embed_dim": 3, "n_embed": 16, "monitor": "val/rec_loss", "ddconfig": ddconfig}}}))
    model = load_model(tmp_path / "vq.ckpt")
    assert model.params["first_stage_config"]["params"]["ddconfig"] == ddconfig
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        assert torch.equal(model.first_stage.decode(model.first_stage.encode(x)), reference.decode(reference.encode(x)))


def test_folders_without_our_layout_are_refused(tmp_path):
    (tmp_path / "model_index.json").write_text("{}")
    with pytest.raises(LatentgenError, match="diffusers folder"):
        load_model(tmp_path)
    (tmp_path / "model_index.json").unlink()
    with pytest.raises(LatentgenError, match="without model.safetensors"):
        load_model(tmp_path)


def test_text_model_with_config_override_and_ignored_official_keys(tmp_path):
    """An SD 1.x-style checkpoint (CLIP keys, position_ids, schedule buffers) at tiny width, its
    text encoder's size given by a partial config."""
    from latentgen.models.text import FrozenCLIPEmbedder

    unet, first_stage, _ = tiny_ldm()
    clip_sizes = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}
    clip = FrozenCLIPEmbedder(config=clip_sizes).eval()
    state = official_layout(unet, first_stage, clip)
    state["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    save_file(state, tmp_path / "sd-tiny.safetensors")
    config = {"cond_stage_config": {"target": "ldm.modules.encoders.modules.FrozenCLIPEmbedder", "params": {"config": clip_sizes}}}
    model = load_model(tmp_path / "sd-tiny.safetensors", config=config)
    assert (model.family, model.spec.conditioning, model.spec.concat) == ("sd1", "text", None)
    assert model.scale_factor == 0.5 and model.spec.schedule.linear_start == 0.00085
    x, t = torch.randn(1, 4, 8, 8), torch.tensor([500.0])
    with torch.no_grad():
        assert torch.equal(model.unet(x, t, context=model.cond_stage(["a red cube"])), unet(x, t, context=clip(["a red cube"])))


def test_bundled_folder_with_frozen_minilm_text_encoder(tmp_path):
    """Our layout: the MiniLM weights come from its package, so the checkpoint has no cond_stage_model keys."""
    from latentgen.models.text import MiniLMEmbedder
    from latentgen.models.unet import UNetModel

    torch.manual_seed(4)
    unet = UNetModel(**{**TINY_UNET, "context_dim": 384}).eval()
    first_stage = tiny_autoencoder("kl")
    folder = tmp_path / "txt2img-tiny"
    folder.mkdir()
    state = {**{"model.diffusion_model." + k: v for k, v in unet.state_dict().items()},
             **{"first_stage_model." + k: v for k, v in first_stage.state_dict().items()}}
    save_file(state, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps({"cond_stage": "minilm", "unet_config": {"params": {"num_heads": 4}}}))
    model = load_model(folder)
    assert isinstance(model.cond_stage, MiniLMEmbedder)
    assert (model.family, model.spec.conditioning) == ("ldm-txt2img", "text")
    params = model.params["unet_config"]["params"]
    assert params["num_heads"] == 4 and params["context_dim"] == 384
    x, t, context = torch.randn(1, 4, 8, 8), torch.tensor([500.0]), torch.randn(1, 77, 384)
    with torch.no_grad():
        reference = UNetModel(**{**TINY_UNET, "context_dim": 384, "num_heads": 4}).eval()
        reference.load_state_dict(unet.state_dict())
        assert torch.equal(model.unet(x, t, context=context), reference(x, t, context=context))


def test_weights_are_materialised_in_the_asked_dtype(tmp_path):
    """A bf16 load holds no float32 copy: every floating tensor arrives in bf16, equal to the
    float32 load rounded."""
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    import tiny_models

    path = tiny_models.official_checkpoint(tmp_path / "cin.safetensors", "cin")
    full, half = load_model(path), load_model(path, dtype=torch.bfloat16)
    for ours, reference in zip(half.unet.state_dict().values(), full.unet.state_dict().values()):
        assert ours.dtype == (torch.bfloat16 if reference.is_floating_point() else reference.dtype)
        assert torch.equal(ours, reference.to(ours.dtype))
    assert all(p.dtype == torch.bfloat16 for m in half.modules() for p in m.parameters())


def test_safetensors_are_read_at_their_offsets_exactly_as_safetensors_reads_them(tmp_path):
    """The reader fills each tensor from its header offsets (no memory map, so loading an fp16 SD
    checkpoint in bf16 stays near one copy): every dtype, 0-d and empty tensors, metadata kept."""
    tensors = {"a": torch.randn(3, 5).half(), "b": torch.randn(7).bfloat16(), "c": torch.tensor(2.5),
               "d": torch.arange(6, dtype=torch.int64).reshape(2, 3), "e": torch.tensor([True, False]),
               "f": torch.empty(0, 4), "g": torch.randn(2, 2).to(torch.float8_e4m3fn)}
    path = tmp_path / "mixed.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt"})
    state, metadata = read_checkpoint(path)
    assert metadata == {"format": "pt"} and state.keys() == tensors.keys()
    for name, tensor in tensors.items():
        assert state[name].dtype == tensor.dtype and state[name].shape == tensor.shape
        assert torch.equal(state[name].reshape(-1).view(torch.uint8), tensor.reshape(-1).view(torch.uint8))
