"""Quantization presses: round-trip error within what the bit width implies, bytes held = the claimed layout."""
import pytest
import torch

from decodekit.kv import GEARPress, KIVIPress, KVQuantPress, RotateKVPress, make_press
from decodekit.kv.presses.kvquant import rotate, unrotate
from decodekit.kv.quant import dequantize, quantize

F16 = 2  # bytes of the float16 cache (and of every scale and zero point)


def randn(*shape, seed=0, dtype=torch.float16):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def rms(a, b):
    return ((a.float() - b.float()) ** 2).mean().sqrt().item()


def rope(n: int, d: int, base: float = 10000.0):
    inv = 1.0 / base ** (torch.arange(0, d, 2).float() / d)
    f = torch.outer(torch.arange(n).float(), inv)
    e = torch.cat([f, f], dim=-1)
    return e.cos(), e.sin()


def group_steps(x: torch.Tensor, dim: int, group: int, bits: int) -> torch.Tensor:
    """Per-element quantization step of its group (by hand from the data), in x's layout."""
    g = x.float().movedim(dim, -1)
    g = g.reshape(*g.shape[:-1], -1, group)
    step = ((g.amax(-1, keepdim=True) - g.amin(-1, keepdim=True)) / ((1 << bits) - 1)).expand_as(g)
    return step.reshape(*step.shape[:-2], -1).movedim(-1, dim)


# ---- KIVI ----

@pytest.mark.parametrize("bits", [2, 4])
def test_kivi_error_bound_full_precision_window_and_bytes(bits):
    h, n, d, group, residual = 2, 50, 16, 8, 16
    k, v = randn(h, n, d, seed=1), randn(h, n, d, seed=2)
    press = KIVIPress(bits=bits, group=group, residual=residual)
    packed = press.pack(k, v)
    k2, v2 = press.unpack(packed)
    nq = (n - residual) // group * group
    assert nq == 32
    # The recent window is exact; the rest within half a step of its group (keys: per channel, groups of tokens;
    # values: per token, groups of channels).
    assert torch.equal(k2[:, nq:], k[:, nq:]) and torch.equal(v2[:, nq:], v[:, nq:])
    for x, x2, dim in ((k, k2, 1), (v, v2, 2)):
        step = group_steps(x[:, :nq], dim, group, bits)
        err = (x2[:, :nq].float() - x[:, :nq].float()).abs()
        assert (err <= step / 2 * 1.01 + 2e-3).all() and err.max() > 0
    codes = 2 * h * nq * d * bits // 8
    scales = 2 * F16 * (h * (nq // group) * d + h * nq * (d // group))
    window = 2 * F16 * h * (n - nq) * d
    assert packed.nbytes() == codes + scales + window
    # The quantized part holds (bits/8 + 4/group) bytes per element against 2: 0.1875 at 2 bits, groups of 32.
    full = KIVIPress(bits=bits, group=32, residual=0).pack(randn(2, 256, 64), randn(2, 256, 64))
    assert full.nbytes() / (2 * 2 * 256 * 64 * F16) == pytest.approx((bits / 8 + 4 / 32) / F16)


@pytest.mark.parametrize("bits", [2, 4])
def test_kivi_packs_concatenate_exactly(bits):
    """Consecutive packs (whole key groups, no recent window) merge into one that reads back as they did, holding
    the same bytes; a pack with full-precision recent tokens is refused."""
    press = KIVIPress(bits=bits, group=8, residual=0)
    parts = [press.pack(randn(2, n, 16, seed=s), randn(2, n, 16, seed=s + 9)) for s, n in ((1, 16), (2, 8), (3, 24))]
    merged = press.concat(parts)
    k, v = press.unpack(merged)
    pieces = [press.unpack(p) for p in parts]
    assert torch.equal(k, torch.cat([x for x, _ in pieces], dim=1))
    assert torch.equal(v, torch.cat([y for _, y in pieces], dim=1))
    assert merged.nbytes() == sum(p.nbytes() for p in parts) and merged.meta["shape"] == (2, 48, 16)
    with pytest.raises(ValueError, match="recent"):
        press.concat([parts[0], KIVIPress(bits=bits, group=8, residual=4).pack(randn(2, 12, 16), randn(2, 12, 16))])


def test_kivi_keys_per_channel_isolate_an_outlier_channel():
    k = randn(2, 64, 16, seed=3).float()
    k[..., 5] *= 100  # an outlier channel, as in real key caches
    press = KIVIPress(bits=2, group=16, residual=0)
    k2, _ = press.unpack(press.pack(k, k))
    others = [c for c in range(16) if c != 5]
    per_channel = rms(k2[..., others], k[..., others])
    c, s, z = quantize(k, 2, dim=2, group=16)  # the same bits per token instead
    per_token = rms(dequantize(c, s, z, 2, 16, torch.float32)[..., others], k[..., others])
    assert per_channel < per_token / 4


# ---- KVQuant ----

def kvquant_data(seed: int, h=2, n=256, d=32):
    """Pre-RoPE keys with per-channel offsets and scales and one outlier channel, as the paper describes."""
    pre = randn(h, n, d, seed=seed, dtype=torch.float32) * torch.linspace(0.2, 3, d) + torch.linspace(-4, 4, d)
    pre[..., 5] *= 6
    return pre, randn(h, n, d, seed=seed + 100, dtype=torch.float32)


def max_level_error(levels: torch.Tensor) -> float:
    """Largest distance from a point of [-1, 1] to its nearest level."""
    lv = levels.float().sort().values
    return max(float(lv[0] + 1), float(1 - lv[-1]), float((lv[1:] - lv[:-1]).max() / 2))


@pytest.mark.parametrize("bits", [2, 4])
def test_kvquant_round_trip_bound_outliers_and_bytes(bits):
    cal_k, cal_v = kvquant_data(0)
    k, v = kvquant_data(1)
    press = KVQuantPress(bits=bits, outlier_fraction=0.1).calibrate(cal_k, cal_v)
    packed = press.pack(k.half(), v.half())
    k2, v2 = press.unpack(packed)
    t = packed.tensors
    lo, hi = press.key_lo.float()[:, None], press.key_hi.float()[:, None]
    inlier = (k.half().float() >= lo) & (k.half().float() <= hi)
    bound = (hi - lo) / 2 * max_level_error(press.key_levels) * 1.01 + 2e-3
    err = (k2.float() - k.half().float()).abs()
    assert (err <= bound)[inlier].all() and err.max() > 0
    assert torch.equal(k2[~inlier], k.half()[~inlier])  # sparse outliers are exact
    assert len(t["k_out_index"]) == int((~inlier).sum()) > 0
    # Values: per-token ranges leave out floor(0.1 * 32 / 2) = 1 entry at each end; those are exact.
    vs = v.half().float().sort(dim=-1).values
    v_lo, v_hi = vs[..., 1:2], vs[..., -2:-1]
    v_in = (v.half().float() >= v_lo) & (v.half().float() <= v_hi)
    v_err = (v2.float() - v.half().float()).abs()
    assert ((v_err <= (v_hi - v_lo) / 2 * max_level_error(press.value_levels) * 1.01 + 2e-3) | ~v_in).all()
    assert torch.equal(v2[~v_in], v.half()[~v_in])
    h, n, d = k.shape
    n_out = len(t["k_out_index"]) + len(t["v_out_index"])
    expected = 2 * h * n * d * bits // 8 + 2 * h * d * F16 + 2 * h * n * F16 + 2 * (1 << bits) * F16 + n_out * (4 + F16)
    assert packed.nbytes() == expected


def test_kvquant_nonuniform_levels_beat_uniform_levels():
    cal_k, cal_v = kvquant_data(0)
    k, v = kvquant_data(1)
    press = KVQuantPress(bits=2).calibrate(cal_k, cal_v)
    uniform = KVQuantPress(bits=2).calibrate(cal_k, cal_v)
    uniform.key_levels = uniform.value_levels = torch.linspace(-1, 1, 4).half()
    nuq_k, nuq_v = press.unpack(press.pack(k, v))
    uni_k, uni_v = uniform.unpack(uniform.pack(k, v))
    assert rms(nuq_k, k) < rms(uni_k, k) and rms(nuq_v, v) < rms(uni_v, v)


def test_kvquant_sensitivity_weights_pull_the_levels():
    cal_k, cal_v = kvquant_data(0)
    plain = KVQuantPress(bits=2).calibrate(cal_k, cal_v)
    weights = (cal_k > cal_k.median()).float() * 100 + 1  # large entries matter most
    weighted = KVQuantPress(bits=2).calibrate(cal_k, cal_v, key_weights=weights)
    assert weighted.key_levels.float().mean() > plain.key_levels.float().mean()


def test_kvquant_quantizes_pre_rope_keys():
    cal_pre, cal_v = kvquant_data(0)
    pre, v = kvquant_data(1)
    cos, sin = rope(pre.shape[1], pre.shape[2])
    post = rotate(pre, (cos, sin))
    assert torch.allclose(unrotate(post, (cos, sin)), pre, atol=1e-4)
    press = KVQuantPress(bits=2).calibrate(rotate(cal_pre, (cos, sin)), cal_v, rope=(cos, sin))
    k2, _ = press.unpack(press.pack(post, v, rope=(cos, sin)), rope=(cos, sin))
    k2_pre, _ = press.unpack(press.pack(pre, v))  # the same quantizer on the pre-RoPE keys directly
    # RoPE is a rotation: the post-RoPE round trip has the pre-RoPE round trip's per-token error.
    assert torch.allclose((k2.float() - post).norm(dim=-1), (k2_pre.float() - pre).norm(dim=-1), atol=1e-3)
    # And quantizing after RoPE (channels mixed by position) is worse, which is why the paper goes pre-RoPE.
    post_press = KVQuantPress(bits=2).calibrate(rotate(cal_pre, (cos, sin)), cal_v)
    k3, _ = post_press.unpack(post_press.pack(post, v))
    assert rms(k2, post) < 0.8 * rms(k3, post)


def test_kvquant_needs_calibration():
    with pytest.raises(ValueError, match="calibrate"):
        KVQuantPress().pack(randn(1, 4, 8), randn(1, 4, 8))


# ---- GEAR ----

def test_gear_low_rank_correction_beats_plain_quantization_on_low_rank_data():
    g = torch.Generator().manual_seed(4)
    x = (torch.randn(2, 128, 1, generator=g) * torch.randn(2, 1, 64, generator=g)
         + 0.02 * torch.randn(2, 128, 64, generator=g)).half()
    plain = GEARPress(bits=2, rank=0, outlier_fraction=0.0)
    gear = GEARPress(bits=2, rank=4, outlier_fraction=0.0)
    assert rms(gear.unpack(gear.pack(x, x))[0], x) < 0.2 * rms(plain.unpack(plain.pack(x, x))[0], x)


@pytest.mark.parametrize("bits", [2, 4])
def test_gear_bound_outliers_and_bytes(bits):
    h, n, d, group, rank = 2, 40, 16, 8, 3
    k, v = randn(h, n, d, seed=5), randn(h, n, d, seed=6)
    plain = GEARPress(bits=bits, group=group, rank=0, outlier_fraction=0.0)
    k2, _ = plain.unpack(plain.pack(k, v))
    assert ((k2.float() - k.float()).abs() <= group_steps(k, 2, group, bits) / 2 * 1.01 + 2e-3).all()
    press = GEARPress(bits=bits, group=group, rank=rank, outlier_fraction=0.05)
    packed = press.pack(k, v)
    k3, v3 = press.unpack(packed)
    n_out = int(0.05 * n * d)
    for x, x3 in ((k, k3), (v, v3)):
        top = x.float().abs().reshape(h, -1).topk(n_out, dim=-1).indices
        assert torch.equal(x3.reshape(h, -1).gather(1, top), x.reshape(h, -1).gather(1, top))
    assert rms(k3, k) < rms(k2, k)  # outliers and the low-rank part only help
    expected = 2 * (h * n * d * bits // 8 + 2 * F16 * h * n * (d // group) + F16 * h * (n + d) * rank
                    + h * n_out * (4 + F16))
    assert packed.nbytes() == expected


# ---- RotateKV ----

def outlier_heavy(seed: int, channels=(3, 5)) -> torch.Tensor:
    x = randn(4, 64, 64, seed=seed, dtype=torch.float32)
    x[..., list(channels)] *= 20
    return x.half()


def test_rotatekv_beats_plain_two_bit_on_outlier_heavy_data():
    x = outlier_heavy(7)
    c, s, z = quantize(x, 2, dim=2, group=64)
    plain = dequantize(c, s, z, 2, 64, torch.float32)
    press = RotateKVPress(bits=2, group=64, n_sink=0)
    k2, v2 = press.unpack(press.pack(x, x))
    assert rms(k2, x) < 0.6 * rms(plain, x) and rms(v2, x) < 0.6 * rms(plain, x)


def test_rotatekv_rotation_is_inverted_exactly():
    press = RotateKVPress(bits=2, head_group=2, block=16).calibrate(outlier_heavy(8))
    r = press._matrix(128, torch.device("cpu"), press.order)
    assert torch.allclose(r @ r.T, torch.eye(128), atol=1e-5)
    # A value already on the grid survives: all-constant tokens quantize exactly, whatever the rotation.
    x = torch.ones(4, 8, 64, dtype=torch.float16) * torch.arange(8, dtype=torch.float16)[None, :, None]
    k2, _ = press.unpack(press.pack(x, x))
    assert torch.allclose(k2.float(), x.float(), atol=2e-2)


def test_rotatekv_outlier_aware_order_spreads_outliers_over_blocks():
    cal, x = outlier_heavy(9), outlier_heavy(10)  # both outlier channels fall in the first 16-channel block
    identity = RotateKVPress(bits=2, block=16, n_sink=0)
    aware = RotateKVPress(bits=2, block=16, n_sink=0).calibrate(cal)
    order = aware.order.long()
    assert {int(order[0]), int(order[16])} == {3, 5}  # one outlier channel leads each of two blocks
    assert rms(aware.unpack(aware.pack(x, x))[0], x) < 0.8 * rms(identity.unpack(identity.pack(x, x))[0], x)


def test_rotatekv_sinks_exact_pre_rope_and_bytes():
    h, n, d = 4, 32, 64
    x = outlier_heavy(11)[:, :n]
    press = RotateKVPress(bits=2, group=32, n_sink=2, head_group=2)
    packed = press.pack(x, x)
    k2, v2 = press.unpack(packed)
    assert torch.equal(k2[:, :2], x[:, :2]) and torch.equal(v2[:, :2], x[:, :2])
    width = 2 * d
    expected = 2 * (h * (n - 2) * d * 2 // 8 + 2 * F16 * (h // 2) * (n - 2) * (width // 32) + h * 2 * d * F16)
    assert packed.nbytes() == expected
    cos, sin = rope(n, d)
    post = rotate(x.float(), (cos, sin)).half()
    k3, _ = press.unpack(press.pack(post, x, rope=(cos, sin)), rope=(cos, sin))
    assert rms(k3, post) == pytest.approx(rms(k2, x), rel=0.05)


@pytest.mark.parametrize("name", ["kivi", "gear", "rotatekv"])
def test_bad_bits_is_a_clear_error(name):
    with pytest.raises(ValueError, match="bits"):
        make_press(name, bits=3)
