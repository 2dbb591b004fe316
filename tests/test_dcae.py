"""DC-AE first stage: parity with diffusers' AutoencoderDC, detection from keys, the bundled-folder
round trip, and the training recipe (loss falls, resume is exact), all at tiny configs."""

import numpy as np
import pytest
import torch

from latentgen import detect, metrics
from latentgen.errors import LatentgenError
from latentgen.loader import load_model
from latentgen.models.dcae import AutoencoderDC, zero_init_residuals
from latentgen.train.autoencoder import AutoencoderConfig, train_autoencoder
from latentgen.train.data import ImageBatches
from latentgen.train.dc import dc_params
from latentgen.train.runs import learning_rate

TINY = [
    # no full-resolution stage (the bundled layout): conv_in / conv_out are pixel-(un)shuffle blocks
    dict(latent_channels=4, encoder_block_out_channels=(16, 16, 32), decoder_block_out_channels=(16, 16, 32),
         encoder_layers_per_block=(0, 1, 2), decoder_layers_per_block=(0, 1, 2)),
    # a full-resolution first stage, batch norm and relu in the decoder's first stage (released DC-AE style)
    dict(latent_channels=8, encoder_block_out_channels=(8, 16, 32), decoder_block_out_channels=(8, 16, 32),
         encoder_layers_per_block=(1, 1, 1), decoder_layers_per_block=(1, 1, 2),
         decoder_norm_types=("batch_norm", "rms_norm", "rms_norm"), decoder_act_fns=("relu", "silu", "silu")),
]


def _random_state(model: torch.nn.Module, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, value in model.state_dict().items():
        if not value.is_floating_point():
            state[key] = value
        elif key.endswith("running_var"):
            state[key] = torch.rand(value.shape, generator=g) + 0.5
        else:
            state[key] = torch.randn(value.shape, generator=g) * 0.2
    return state


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.slow  # importing diffusers takes most of it
@pytest.mark.parametrize("config", TINY)
def test_matches_diffusers_autoencoder_dc_on_the_same_tensors(config):
    diffusers = pytest.importorskip("diffusers")
    stages = len(config["encoder_block_out_channels"])
    theirs = diffusers.AutoencoderDC(**config, encoder_block_types="ResBlock", decoder_block_types="ResBlock",
                                     encoder_qkv_multiscales=((),) * stages, decoder_qkv_multiscales=((),) * stages)
    state = _random_state(theirs.eval())
    theirs.load_state_dict(state)
    ours = AutoencoderDC(**config).eval()
    ours.load_state_dict(state, strict=True)  # same key names: the checkpoint format
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        z = theirs.encode(x).latent
        assert _rel(ours.encode(x), z) <= 1e-4
        assert _rel(ours.decode(z), theirs.decode(z).sample) <= 1e-4
    assert ours.embed_dim == config["latent_channels"]


@pytest.mark.slow
def test_reference_conversion_gives_diffusers_the_same_dc_ae():
    """bench and the parity tests compare against diffusers through reference.first_stage_to_diffusers."""
    pytest.importorskip("diffusers")
    from latentgen.reference import first_stage_to_diffusers

    config = TINY[0]
    ours = AutoencoderDC(**config).eval()
    ours.load_state_dict(_random_state(ours))
    theirs = first_stage_to_diffusers(ours, config).eval()
    z = torch.randn(1, config["latent_channels"], 4, 4, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert _rel(ours.decode(z), theirs.decode(z).sample) <= 1e-4


@pytest.mark.parametrize("config", TINY)
def test_detection_rebuilds_the_architecture_from_keys(config):
    config = {k: v for k, v in config.items() if k != "decoder_act_fns"}  # activations are not in the shapes
    model = AutoencoderDC(**config).eval()
    state = _random_state(model)
    detected = detect.detect_config(state)
    first = detected["first_stage_config"]
    assert detect.target_name(first) == "AutoencoderDC" and detect.first_stage_factor(first) == 4
    rebuilt = AutoencoderDC(**first["params"]).eval()
    rebuilt.load_state_dict(state, strict=True)
    model.load_state_dict(state)
    x = torch.rand(1, 3, 16, 24) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.decode(rebuilt.encode(x)), model.decode(model.encode(x)))


def test_attention_stages_are_refused_in_one_line():
    state = _random_state(AutoencoderDC(**TINY[0]))
    state["encoder.down_blocks.2.0.attn.to_q.weight"] = torch.zeros(4, 4)
    with pytest.raises(LatentgenError, match="EfficientViT"):
        detect.detect_config(state)


def test_zero_initialised_blocks_are_the_identity():
    model = AutoencoderDC(**TINY[0])
    zero_init_residuals(model)
    block = model.encoder.down_blocks[2][0]
    x = torch.randn(1, 32, 4, 4)
    torch.testing.assert_close(block(x), x)


def test_learning_rate_warms_up_then_decays_to_the_floor():
    rates = [learning_rate(step, 1e-3, 10, 100, 0.02) for step in range(101)]
    assert rates[0] == pytest.approx(1e-4) and rates[9] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(rates[10:], rates[11:]))
    assert rates[100] == pytest.approx(2e-5)


def _photos(count=6, size=16) -> ImageBatches:
    g = np.random.default_rng(0)
    base = g.integers(0, 256, (count, size // 4, size // 4, 3), dtype=np.uint8)
    return ImageBatches(base.repeat(4, 1).repeat(4, 2), crop=size)


def _config(steps: int) -> AutoencoderConfig:
    return AutoencoderConfig(kind="dc", widths=(8, 8, 16), encoder_layers=(0, 1, 1), decoder_layers=(0, 1, 1),
                             z_channels=4, crop=16, batch=2, lr=3e-3, warmup=2, steps=steps, ssim_weight=0.0,
                             fft_weight=0.0, checkpoint_every=2, device="cpu")


def _run(steps, run_dir, images=None):
    logs = []
    trainer = train_autoencoder(_config(steps), images or _photos(), run_dir, quiet=True,
                                on_step=lambda step, log: logs.append(log))
    return trainer, logs


def test_resume_is_exact_and_the_export_loads_as_a_bundled_folder(tmp_path):
    straight, logs = _run(4, tmp_path / "straight")
    _run(2, tmp_path / "resumed")
    resumed, resumed_logs = _run(4, tmp_path / "resumed")
    assert resumed.step == 4
    assert [log["loss"] for log in resumed_logs] == [log["loss"] for log in logs[2:]]
    for key, value in straight.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[key], value, rtol=0, atol=0)
    assert (tmp_path / "straight" / "log.jsonl").read_text().count("\n") == 2  # one line per checkpoint

    loaded = load_model(tmp_path / "straight" / "export")
    assert loaded.unet is None and loaded.family == "autoencoder-dc"
    assert loaded.first_stage.embed_dim == 4
    x = _photos().sample(2, torch.Generator().manual_seed(1))[0]
    reference = straight.model.half().float().eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded.first_stage.decode(loaded.first_stage.encode(x)),
                                   reference.decode(reference.encode(x)), rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_training_lowers_the_loss(tmp_path):
    _, logs = _run(40, tmp_path, _photos(2))
    assert np.mean([log["mse"] for log in logs[-5:]]) < 0.7 * np.mean([log["mse"] for log in logs[:5]])


def test_dc_params_are_diffusers_config_names():
    import inspect

    accepted = set(inspect.signature(AutoencoderDC).parameters)
    assert set(dc_params((8, 8, 16), (0, 1, 1), (0, 1, 1), 4)) <= accepted


def test_chroma_error_sees_hue_and_not_detail():
    g = torch.Generator().manual_seed(0)
    green = torch.tensor([-0.6, 0.4, -0.5]).view(1, 3, 1, 1).expand(1, 3, 16, 16).clone()
    grey = green.mean(1, keepdim=True).expand_as(green)
    noisy = (green + 0.1 * torch.randn(green.shape, generator=g)).clamp(-1, 1)
    assert metrics.chroma_error(green, green) == 0
    assert metrics.chroma_error(grey, green) > 20  # green turned grey
    assert metrics.chroma_error(noisy, green) < 2  # pixel noise averages out in 8x8 blocks
    assert metrics.green_share(green) == 1 and metrics.green_share(grey) == 0
    lab = metrics.srgb_to_lab(torch.ones(1, 3, 1, 1))
    torch.testing.assert_close(lab.flatten(), torch.tensor([100.0, 0.0, 0.0], dtype=lab.dtype), atol=1e-2, rtol=0)
