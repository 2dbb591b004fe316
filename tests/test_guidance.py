import pytest
import torch

from latentgen.errors import LatentgenError
from latentgen.guidance import Conditioning, classifier_free_guidance, guided_model, unet_model
from latentgen.models.unet import UNetModel
from latentgen.samplers import make_noise, sample
from latentgen.schedules import make_alphas_cumprod

B, C, H = 2, 4, 8


class FakeUNet:
    """A UNet-shaped function that depends on every conditioning part, and counts its calls."""

    def __init__(self):
        self.batches = []

    def __call__(self, x, timesteps, context=None, y=None):
        self.batches.append(x.shape[0])
        out = 0.9 * x[:, :C] + 1e-3 * timesteps.view(-1, 1, 1, 1)
        if x.shape[1] > C:
            out = out + x[:, C:].mean(1, keepdim=True)
        if context is not None:
            out = out * context.mean(dim=(1, 2)).view(-1, 1, 1, 1)
        if y is not None:
            out = out + 0.1 * y.view(-1, 1, 1, 1).float()
        return out


def conditionings(concat_in_uncond=True):
    g = torch.Generator().manual_seed(0)
    concat = torch.randn(B, 3, H, H, generator=g)
    cond = Conditioning(context=torch.randn(B, 5, 6, generator=g), y=torch.tensor([3, 7]), concat=concat)
    uncond = Conditioning(context=torch.randn(B, 5, 6, generator=g), y=torch.tensor([10, 10]),
                          concat=concat if concat_in_uncond else None)
    return cond, uncond


X = make_noise((B, C, H, H), seed=1)
T = torch.tensor([981.0, 981.0])


def test_scale_one_is_the_conditional_model_alone():
    unet = FakeUNet()
    cond, uncond = conditionings()
    guided = guided_model(unet, cond, uncond, scale=1.0)(X, T)
    assert unet.batches == [B]
    assert torch.equal(guided, unet_model(FakeUNet())(X, T, cond))


@pytest.mark.parametrize("scale", [0.0, 3.0, 7.5])
def test_guided_output_is_uncond_plus_scale_times_difference(scale):
    cond, uncond = conditionings()
    unet = FakeUNet()
    by_hand_uncond = unet(torch.cat([X, uncond.concat], 1), T, context=uncond.context, y=uncond.y)
    by_hand_cond = unet(torch.cat([X, cond.concat], 1), T, context=cond.context, y=cond.y)
    expected = by_hand_uncond + scale * (by_hand_cond - by_hand_uncond)
    assert torch.allclose(guided_model(FakeUNet(), cond, uncond, scale)(X, T), expected, atol=1e-6)


def test_one_batched_forward_or_two_separate_ones_agree():
    cond, uncond = conditionings()
    batched_unet, separate_unet = FakeUNet(), FakeUNet()
    batched = guided_model(batched_unet, cond, uncond, 5.0)(X, T)
    separate = guided_model(separate_unet, cond, uncond, 5.0, batched=False)(X, T)
    assert batched_unet.batches == [2 * B] and separate_unet.batches == [B, B]
    assert torch.allclose(batched, separate, atol=1e-6)


def test_unconditional_half_shares_the_concat_image():
    cond, uncond = conditionings()
    _, uncond_without_concat = conditionings(concat_in_uncond=False)
    assert torch.equal(guided_model(FakeUNet(), cond, uncond_without_concat, 4.0)(X, T),
                       guided_model(FakeUNet(), cond, uncond, 4.0)(X, T))


def test_mismatched_parts_are_refused():
    cond, uncond = conditionings()
    with pytest.raises(ValueError, match="context"):
        guided_model(FakeUNet(), cond, Conditioning(y=uncond.y), 2.0)(X, T)


@pytest.mark.parametrize("scale,uncond,message", [(2.0, None, "unconditional"), (-1.0, Conditioning(), "0 or more"),
                                                  (float("nan"), Conditioning(), "0 or more")])
def test_bad_scales_are_user_errors(scale, uncond, message):
    with pytest.raises(LatentgenError, match=message):
        guided_model(FakeUNet(), Conditioning(), uncond, scale)


def test_guidance_wraps_any_conditional_model():
    cond, uncond = conditionings()
    calls = []

    def model(x, t, c):
        calls.append(c)
        return x * c.context.mean()

    out = classifier_free_guidance(model, cond, uncond, 2.0, batched=False)(X, T)
    expected = X * uncond.context.mean() + 2.0 * (X * cond.context.mean() - X * uncond.context.mean())
    assert torch.allclose(out, expected, atol=1e-6) and calls[1] is cond


def tiny_unet():
    """CompVis UNet with all three conditioning routes: 3 concat channels, class labels, cross-attention."""
    torch.manual_seed(0)
    unet = UNetModel(image_size=H, in_channels=C + 3, out_channels=C, model_channels=32, attention_resolutions=[1, 2],
                     num_res_blocks=1, channel_mult=[1, 2], use_spatial_transformer=True, context_dim=6,
                     num_heads=2, num_classes=11, legacy=False).eval()
    with torch.no_grad():
        for parameter in unet.parameters():  # the output convolution starts at zero
            parameter.normal_(0, 0.05)
    return unet


def test_real_unet_batched_and_separate_sampling_agree():
    unet, (cond, uncond) = tiny_unet(), conditionings()
    alphas_cumprod = make_alphas_cumprod("linear", 1000, 0.00085, 0.012)
    with torch.no_grad():
        results = [sample("ddim", guided_model(unet, cond, uncond, 3.0, batched=batched), X, alphas_cumprod, "eps", 5)
                   for batched in (True, False)]
        unguided = sample("ddim", lambda x, t: unet_model(unet)(x, t, cond), X, alphas_cumprod, "eps", 5)
        scale_one = sample("ddim", guided_model(unet, cond, uncond, 1.0), X, alphas_cumprod, "eps", 5)
    assert (results[0] - results[1]).abs().max() < 1e-5 * results[1].abs().max()
    assert torch.equal(scale_one, unguided)
    assert not torch.allclose(results[0], unguided, atol=1e-3)
