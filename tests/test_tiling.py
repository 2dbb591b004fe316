import torch

from latentgen.tiling import map_tiled, tile_starts


def test_tile_starts_cover_and_overlap():
    starts = tile_starts(100, 32, 8)
    assert starts[0] == 0 and starts[-1] == 100 - 32
    assert all(b - a <= 32 - 8 for a, b in zip(starts, starts[1:]))
    assert tile_starts(20, 32, 8) == [0]


def test_identity_function_is_reproduced_exactly():
    x = torch.randn(1, 3, 70, 45)
    y = map_tiled(lambda t: t, x, tile=24, overlap=6, factor=1)
    torch.testing.assert_close(y, x)


def test_upsampling_function_blends_without_seams():
    x = torch.randn(2, 3, 50, 37)
    up = lambda t: torch.nn.functional.interpolate(t, scale_factor=4, mode="nearest")
    torch.testing.assert_close(map_tiled(up, x, tile=16, overlap=4, factor=4), up(x))


def test_flat_input_stays_flat():
    x = torch.full((1, 3, 64, 64), 0.3)
    noisy_offsetless = lambda t: t * 2
    y = map_tiled(noisy_offsetless, x, tile=20, overlap=5, factor=1)
    assert torch.allclose(y, torch.full_like(y, 0.6))


def test_half_precision_tiles_are_blended_in_float32():
    """Tiles of a bf16 decode are summed in float32: the overlaps keep the tiles' own values."""
    x = torch.randn(1, 3, 70, 45).bfloat16()
    y = map_tiled(lambda t: t, x, tile=24, overlap=6, factor=1)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, x.float(), rtol=1e-6, atol=1e-6)
