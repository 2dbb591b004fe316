"""First-stage autoencoders against diffusers on identical random weights, converted by
`latentgen.reference` with diffusers' own CompVis-to-diffusers utilities; plus the official key layout and the VQ loss/gradient semantics."""

import pytest
import torch
from diffusers import AutoencoderKL as DiffusersKL
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

from latentgen.errors import LatentgenError
from latentgen.models.autoencoder import AutoencoderKL, VectorQuantizer, VQModel
from latentgen.reference import first_stage_to_diffusers

TOLERANCE = 1e-4


def ddconfig(z_channels, ch_mult, attn_resolutions=(), double_z=True, ch=128, num_res_blocks=2, **extra):
    """A ddconfig shaped like the official `models/first_stage_models/*/config.yaml`."""
    return dict(double_z=double_z, z_channels=z_channels, resolution=256, in_channels=3, out_ch=3, ch=ch,
                ch_mult=list(ch_mult), num_res_blocks=num_res_blocks, attn_resolutions=list(attn_resolutions),
                dropout=0.0, **extra)


# name: (ddconfig, embed_dim, n_embed or None for KL, input size)
OFFICIAL = {
    "kl-f4": (ddconfig(3, [1, 2, 4]), 3, None, 32),
    "kl-f8": (ddconfig(4, [1, 2, 4, 4]), 4, None, 32),
    "kl-f16": (ddconfig(16, [1, 1, 2, 2, 4], [16]), 16, None, 64),
    "kl-f32": (ddconfig(64, [1, 1, 2, 2, 4, 4], [16, 8]), 64, None, 64),
    "vq-f4": (ddconfig(3, [1, 2, 4], double_z=False), 3, 8192, 32),
    "vq-f4-noattn": (ddconfig(3, [1, 2, 4], double_z=False, attn_type="none"), 3, 8192, 32),
    "vq-f8": (ddconfig(4, [1, 2, 2, 4], [32], double_z=False), 4, 16384, 32),
    "vq-f16": (ddconfig(8, [1, 1, 2, 2, 4], [16], double_z=False), 8, 16384, 64),
}

# One structural feature each, at a width where a forward pass takes milliseconds.
TINY = {
    "kl-attn-none": (ddconfig(4, [1, 2], ch=32, num_res_blocks=1, attn_type="none"), 4, None, 16),
    "kl-attn-levels": (ddconfig(4, [1, 2, 2], [256, 64], ch=32, num_res_blocks=1), 4, None, 16),
    "vq-attn-vanilla": (ddconfig(3, [1, 2], ch=32, num_res_blocks=2, double_z=False), 3, 64, 16),
    "vq-attn-levels-noattn": (ddconfig(3, [1, 2], [128], ch=32, num_res_blocks=1, double_z=False,
                                       attn_type="none"), 3, 64, 16),
    "vq-attn-levels": (ddconfig(4, [1, 1, 2], [256, 128], ch=32, num_res_blocks=1, double_z=False), 4, 64, 16),
}


def build(cfg, embed_dim, n_embed):
    return AutoencoderKL(cfg, embed_dim) if n_embed is None else VQModel(cfg, n_embed, embed_dim)


@torch.no_grad()
def randomise(model, seed=0):
    """Random weights at a scale that keeps activations O(1), so every path reaches the output."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=gen)
        if p.ndim == 4:
            p.copy_(noise / p[0].numel() ** 0.5)
        elif "norm" in name and name.endswith("weight"):
            p.copy_(1 + 0.1 * noise)
        else:
            p.copy_(0.05 * noise)


def relative_error(ours, reference):
    return ((ours - reference).abs().max() / reference.abs().max()).item()


@torch.no_grad()
def check_parity(name, cfg, embed_dim, n_embed, size):
    torch.manual_seed(0)
    model = build(cfg, embed_dim, n_embed).eval()
    randomise(model)
    x = torch.rand(2, 3, size, size) * 2 - 1
    if n_embed is not None:  # a codebook at the scale of the latents, so indices actually vary
        h = model.encode(x)
        model.quantize.embedding.weight.normal_(0, h.std().item(), generator=torch.Generator().manual_seed(1))
    reference = first_stage_to_diffusers(model, {"ddconfig": cfg, "embed_dim": embed_dim, "n_embed": n_embed})

    if n_embed is None:
        ours_latent, ref_latent = model.encode(x), reference.encode(x).latent_dist.mean
    else:
        ours_latent, ref_latent = model.encode(x), reference.encode(x).latents
        ours_indices = model.quantize(ours_latent)[2][2]
        ref_indices = reference.quantize(ref_latent)[2][2]
        assert torch.equal(ours_indices, ref_indices), name
        assert ours_indices.unique().numel() > 1
    ours_image, ref_image = model.decode(ours_latent), reference.decode(ours_latent).sample
    errors = relative_error(ours_latent, ref_latent), relative_error(ours_image, ref_image)
    print(f"{name}: latent {errors[0]:.2e}  image {errors[1]:.2e}")
    assert ours_image.shape == (2, 3, size, size)
    assert max(errors) <= TOLERANCE, (name, errors)


@pytest.mark.parametrize("name", TINY)
def test_tiny_structures_match_diffusers(name):
    check_parity(name, *TINY[name])


@pytest.mark.slow
@pytest.mark.parametrize("name", OFFICIAL)
def test_official_first_stage_configs_match_diffusers(name):
    check_parity(name, *OFFICIAL[name])


def test_sd_vae_key_layout_is_official():
    with torch.device("meta"):
        model = AutoencoderKL(ddconfig(4, [1, 2, 4, 4]), embed_dim=4)
        reference = DiffusersKL(block_out_channels=[128, 256, 512, 512], latent_channels=4, layers_per_block=2,
                                down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes["encoder.conv_in.weight"] == (128, 3, 3, 3)
    assert shapes["encoder.down.0.block.0.norm1.weight"] == (128,)
    assert shapes["encoder.down.1.block.0.nin_shortcut.weight"] == (256, 128, 1, 1)
    assert shapes["encoder.down.2.downsample.conv.weight"] == (512, 512, 3, 3)
    assert shapes["encoder.mid.attn_1.q.weight"] == (512, 512, 1, 1)
    assert shapes["encoder.mid.attn_1.proj_out.bias"] == (512,)
    assert shapes["encoder.conv_out.weight"] == (8, 512, 3, 3)
    assert shapes["quant_conv.weight"] == (8, 8, 1, 1)
    assert shapes["post_quant_conv.weight"] == (4, 4, 1, 1)
    assert shapes["decoder.conv_in.weight"] == (512, 4, 3, 3)
    assert shapes["decoder.up.0.block.2.conv2.weight"] == (128, 128, 3, 3)
    assert shapes["decoder.up.3.upsample.conv.weight"] == (512, 512, 3, 3)
    assert shapes["decoder.norm_out.weight"] == (128,)
    assert not any(k.startswith(("encoder.down.3.downsample", "decoder.up.0.upsample")) for k in shapes)
    assert not any(".attn." in k for k in shapes)
    converted = convert_ldm_vae_checkpoint(model.state_dict(), {"down_block_types": [0] * 4, "up_block_types": [0] * 4})
    assert set(converted) == set(reference.state_dict())
    assert len(shapes) == 248


def test_vq_straight_through_gradient_reaches_encoder():
    torch.manual_seed(0)
    model = VQModel(TINY["vq-attn-vanilla"][0], n_embed=64, embed_dim=3)
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    h = model.encode(x)
    h.retain_grad()
    weight = torch.randn(1, 3, 16, 16)
    (model.decode(h) * weight).sum().backward()
    quant, _, _ = model.quantize(h.detach())
    quant.requires_grad_(True)
    (model.decoder(model.post_quant_conv(quant)) * weight).sum().backward()
    torch.testing.assert_close(h.grad, quant.grad)  # identity through the quantiser
    assert model.encoder.conv_in.weight.grad.abs().sum() > 0
    assert model.quantize.embedding.weight.grad is None  # only the loss trains the codebook


@pytest.mark.parametrize("legacy", [True, False])
def test_vq_loss_matches_hand_computation(legacy):
    torch.manual_seed(0)
    beta = 0.25
    quantizer = VectorQuantizer(16, 4, beta=beta, legacy=legacy, sane_index_shape=True)
    torch.nn.init.normal_(quantizer.embedding.weight)
    z = torch.randn(2, 4, 3, 5, requires_grad=True)
    z_q, loss, (_, _, indices) = quantizer(z)

    codebook = quantizer.embedding.weight.detach()
    flat = z.detach().permute(0, 2, 3, 1).reshape(-1, 4)
    expected_indices = torch.cdist(flat, codebook).argmin(1)
    nearest = codebook[expected_indices]
    mse = ((nearest - flat) ** 2).mean()
    assert torch.equal(indices, expected_indices.reshape(2, 3, 5))
    torch.testing.assert_close(z_q.detach(), nearest.reshape(2, 3, 5, 4).permute(0, 3, 1, 2))
    torch.testing.assert_close(loss.detach(), (1 + beta) * mse)

    loss.backward()
    encoder_weight, codebook_weight = (1.0, beta) if legacy else (beta, 1.0)
    residual = 2 * (flat - nearest) / flat.numel()
    torch.testing.assert_close(z.grad.permute(0, 2, 3, 1).reshape(-1, 4), encoder_weight * residual)
    expected_codebook_grad = torch.zeros_like(codebook).index_add_(0, expected_indices, -codebook_weight * residual)
    torch.testing.assert_close(quantizer.embedding.weight.grad, expected_codebook_grad)


def test_nearest_codes_are_the_brute_force_argmin_across_chunks():
    torch.manual_seed(0)
    quantizer = VectorQuantizer(50, 3, beta=0.25)
    torch.nn.init.normal_(quantizer.embedding.weight)
    flat = torch.randn(700, 3)
    expected = torch.cdist(flat, quantizer.embedding.weight).argmin(1)
    assert torch.equal(quantizer.nearest(flat, rows=256), expected)
    z = flat[:200].reshape(2, 3, 10, 10)
    torch.testing.assert_close(quantizer.lookup(z), quantizer(z)[0], rtol=0, atol=0)


def test_decode_indices_equals_decode_of_quantised_latent():
    torch.manual_seed(0)
    model = VQModel(TINY["vq-attn-vanilla"][0], n_embed=64, embed_dim=3, sane_index_shape=True).eval()
    with torch.no_grad():
        h = model.encode(torch.rand(2, 3, 16, 16) * 2 - 1)
        indices = model.quantize(h)[2][2]
        torch.testing.assert_close(model.decode_indices(indices, (2, 8, 8, 3)), model.decode(h))


def test_kl_logvar_is_clamped_and_mean_is_encode():
    torch.manual_seed(0)
    model = AutoencoderKL(TINY["kl-attn-none"][0], embed_dim=4).eval()
    with torch.no_grad():
        model.quant_conv.bias[4:] = 1e3
        x = torch.rand(1, 3, 16, 16)
        mean, logvar = model.encode_moments(x)
        assert torch.equal(logvar, torch.full_like(logvar, 20.0))
        torch.testing.assert_close(mean, model.encode(x))
    assert model.get_last_layer() is model.decoder.conv_out.weight


@pytest.mark.parametrize("make", [
    lambda: VQModel(TINY["vq-attn-vanilla"][0], n_embed=8, embed_dim=3, remap="used_indices.npy"),
    lambda: AutoencoderKL(ddconfig(4, [1], ch=32, num_res_blocks=1, double_z=False), embed_dim=4),
    lambda: AutoencoderKL(ddconfig(4, [1], ch=32, num_res_blocks=1, attn_type="linear"), embed_dim=4),
    lambda: AutoencoderKL(ddconfig(4, [1], ch=32, num_res_blocks=1, tanh_out=True), embed_dim=4),
])
def test_unsupported_options_are_user_errors(make):
    with pytest.raises(LatentgenError):
        make()
