import pytest
import torch

from decodekit.kv.quant import (dequantize, hadamard, kmeans_1d, nearest_level, pack_bits, quantize, split_outliers,
                                add_outliers, unpack_bits)


@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("n", [1, 7, 8, 13])
def test_pack_bits_round_trips_and_holds_bits_per_code(bits, n):
    g = torch.Generator().manual_seed(n)
    codes = torch.randint(0, 1 << bits, (3, 2, n), generator=g, dtype=torch.uint8)
    packed = pack_bits(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (3, 2, -(-n * bits // 8))
    assert torch.equal(unpack_bits(packed, bits, n), codes)


def test_pack_bits_layout():
    assert pack_bits(torch.tensor([1, 2, 3, 0], dtype=torch.uint8), 2).tolist() == [1 | 2 << 2 | 3 << 4]
    assert pack_bits(torch.tensor([5, 12], dtype=torch.uint8), 4).tolist() == [5 | 12 << 4]


@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("dim", [1, 2])
def test_quantize_error_within_half_a_step(bits, dim):
    x = torch.randn(2, 16, 8) * 3 + 1
    group = 4
    codes, scale, zero = quantize(x, bits, dim, group)
    assert codes.shape == x.shape and int(codes.max()) < (1 << bits)
    back = dequantize(codes, scale, zero, dim, group, torch.float32)
    # Each group's step from the data itself, by hand.
    g = x.movedim(dim, -1).reshape(*x.movedim(dim, -1).shape[:-1], -1, group)
    step = (g.amax(-1) - g.amin(-1)) / ((1 << bits) - 1)
    bound = (step[..., None] / 2 * 1.01 + 2e-3 * g.abs().amax(-1, keepdim=True)).expand_as(g)
    err = (back - x).abs().movedim(dim, -1).reshape(g.shape)
    assert (err <= bound).all()
    assert err.max() > 0  # really quantized


def test_hadamard_is_orthonormal():
    for n in (1, 2, 8, 64):
        h = hadamard(n)
        assert torch.allclose(h @ h.T, torch.eye(n), atol=1e-6)
        assert torch.allclose(h.abs(), torch.full((n, n), n ** -0.5))
    with pytest.raises(ValueError, match="power-of-two"):
        hadamard(12)


def test_kmeans_finds_cluster_means_and_respects_weights():
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(500, generator=g) * 0.05 - 1, torch.randn(500, generator=g) * 0.05 + 2])
    c = kmeans_1d(x, 2)
    assert torch.allclose(c, torch.tensor([x[:500].mean(), x[500:].mean()], dtype=torch.float64), atol=1e-6)
    # One centre, weights: the weighted mean.
    w = torch.rand(1000, generator=g)
    weighted_mean = float((x.double() * w.double()).sum() / w.double().sum())
    assert kmeans_1d(x, 1, w).item() == pytest.approx(weighted_mean, abs=1e-9)
    levels = torch.tensor([-1.0, 0.0, 0.5])
    assert nearest_level(torch.tensor([-2.0, -0.4, 0.2, 0.3, 9.0]), levels).tolist() == [0, 1, 1, 2, 2]


def test_sparse_outliers_round_trip():
    x = torch.randn(3, 4, 5)
    mask = x.abs() > 1
    dense, sparse = split_outliers(x, mask, torch.float32)
    assert (dense[mask] == 0).all() and sparse["index"].dtype == torch.int32
    assert torch.equal(add_outliers(dense, sparse), x)
