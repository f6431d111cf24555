"""Rope scaling against transformers: logits of tiny random models (float32) for every scaling rule, at positions
long enough for the rule to matter (a few hundred tokens against small original lengths)."""
from __future__ import annotations

import pytest
import torch

from transformers import AutoConfig, AutoModelForCausalLM
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from decodekit.models.config import ModelConfig, shape
from decodekit.models.kv_cache import private_pool
from decodekit.models.rope import rope_init, rope_table
from decodekit.models.transformer import Transformer, convert_hf_state_dict

SEQ = 320  # tokens per test sequence: well past the original lengths below


def llama(rope: dict, max_positions: int = 1024, **extra) -> dict:
    """A tiny Llama config dict (transformers 5.x `rope_parameters`)."""
    hf = shape("tiny-llama").to_hf()
    hf.update(rope_parameters={"rope_theta": 10_000.0, **rope}, max_position_embeddings=max_positions, **extra)
    return hf


def gemma_5x(global_rope: dict) -> dict:
    """Tiny Gemma 3 in the transformers 5.x format: rope parameters nested per layer type."""
    hf = shape("tiny-gemma3").to_hf()
    hf["rope_parameters"] = {"full_attention": {"rope_theta": 1_000_000.0, **global_rope},
                             "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}}
    return hf


def gemma_4x(rope_scaling: dict) -> dict:
    """The same model in the transformers 4.x format: `rope_scaling` (global layers only), `rope_local_base_freq`."""
    hf = shape("tiny-gemma3").to_hf()
    del hf["rope_parameters"]
    hf.update(rope_scaling=rope_scaling, rope_theta=1_000_000.0, rope_local_base_freq=10_000.0)
    return hf


YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128}
LONGROPE = {"rope_type": "longrope", "original_max_position_embeddings": 512,
            "short_factor": [1.0, 1.1, 1.3, 1.7, 2.2, 3.0, 4.1, 5.5],  # head_dim 16: 8 frequencies
            "long_factor": [1.0, 1.5, 2.5, 4.0, 6.0, 9.0, 13.0, 19.0]}
CASES = {
    "default": llama({"rope_type": "default"}),
    "linear": llama({"rope_type": "linear", "factor": 4.0}),
    "llama3": llama({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 64}),
    "yarn": llama(YARN),
    "yarn-mscale": llama({**YARN, "mscale": 0.8, "mscale_all_dim": 0.3, "beta_fast": 16, "beta_slow": 2}),
    "longrope-short": llama(LONGROPE, max_positions=2048),  # within the original length: the short factors
    "dynamic": llama({"rope_type": "dynamic", "factor": 2.0}, max_positions=SEQ),
    "llama3-4x-format": {**{k: v for k, v in llama({}).items() if k != "rope_parameters"}, "rope_theta": 500_000.0,
                         "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                          "high_freq_factor": 4.0, "original_max_position_embeddings": 64}},
    "gemma3-linear-5x": gemma_5x({"rope_type": "linear", "factor": 8.0}),
    "gemma3-linear-4x": gemma_4x({"rope_type": "linear", "factor": 8.0}),
    "gemma3-yarn-5x": gemma_5x(YARN),
}


def make_pair(hf: dict, seed: int = 0):
    """A transformers model built from `hf` with random weights, and the native model read from the same dict."""
    torch.manual_seed(seed)
    ref = AutoModelForCausalLM.from_config(AutoConfig.for_model(**hf), attn_implementation="eager").float().eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0, 0.3 if p.dim() == 1 else 0.1)
    config = ModelConfig.from_hf(hf)
    model = Transformer(config).eval()
    model.load_state_dict(convert_hf_state_dict(ref.state_dict(), config), strict=True)
    return ref, model


@pytest.mark.parametrize("case", CASES)
def test_logits_match_transformers(case):
    ref, model = make_pair(CASES[case])
    ids = torch.randint(0, model.config.vocab_size, (1, SEQ), generator=torch.Generator().manual_seed(1))
    n = SEQ - 4
    model.ensure_rope(SEQ)
    _, kv = private_pool(model, SEQ)
    with torch.no_grad():
        expected = ref(ids).logits[0]
        got = torch.cat([model.forward_seq(kv, ids[0, :n].tolist(), list(range(n)))]  # prefill, then one at a time
                        + [model.forward_seq(kv, [int(ids[0, i])], [i]) for i in range(n, SEQ)])
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("case", ["linear", "llama3", "yarn", "yarn-mscale", "longrope-short"])
def test_tables_use_transformers_init(case):
    """inv_freq and the cos/sin factor are transformers' own, and the rule changes them (the test can fail)."""
    hf = CASES[case]
    config = AutoConfig.for_model(**hf)
    inv_freq, scaling = ROPE_INIT_FUNCTIONS[config.rope_parameters["rope_type"]](config, None)
    got_inv, got_scaling = rope_init(hf, "global")
    assert torch.equal(got_inv, inv_freq.float()) and got_scaling == scaling
    default_inv, _ = rope_init(llama({"rope_type": "default"}), "global")
    assert not torch.equal(got_inv, default_inv) or scaling != 1.0
    table = rope_table(ModelConfig.from_hf(hf), "global", 64)
    torch.testing.assert_close(table[0, 5, :8], torch.cos(5 * inv_freq) * scaling, rtol=0, atol=1e-6)


@pytest.mark.parametrize("hf", [CASES["gemma3-linear-5x"], CASES["gemma3-linear-4x"]], ids=["5.x", "4.x"])
def test_gemma3_scales_global_layers_only(hf):
    config = ModelConfig.from_hf(hf)
    assert config.rope_scaling["factor"] == 8.0 and config.local_rope_scaling is None
    assert (config.rope_theta, config.local_rope_theta) == (1_000_000.0, 10_000.0)
    glob, _ = rope_init(hf, "global")
    local, _ = rope_init(hf, "local")
    base = 1.0 / (1_000_000.0 ** (torch.arange(0, 16, 2).float() / 16))
    torch.testing.assert_close(glob, base / 8.0)
    torch.testing.assert_close(local, 1.0 / (10_000.0 ** (torch.arange(0, 16, 2).float() / 16)))


def test_round_trip_keeps_the_rope_parameters():
    for case, hf in CASES.items():
        config = ModelConfig.from_hf(hf)
        assert ModelConfig.from_hf(AutoConfig.for_model(**config.to_hf()).to_dict()) == config, case


def test_dynamic_past_max_positions_is_refused():
    config = ModelConfig.from_hf(CASES["dynamic"])
    rope_table(config, "global", SEQ)  # within max_position_embeddings: the default rule, as transformers
    with pytest.raises(NotImplementedError, match="dynamic NTK"):
        rope_table(config, "global", SEQ + 1)


def test_longrope_past_original_length_is_refused():
    config = ModelConfig.from_hf(CASES["longrope-short"])
    rope_table(config, "global", 512)
    with pytest.raises(NotImplementedError, match="long factors"):
        rope_table(config, "global", 513)
    model = Transformer(config)
    with pytest.raises(NotImplementedError, match="original_max_position_embeddings=512"):
        model.ensure_rope(600)


def test_partial_rotary_is_refused():
    hf = llama({"rope_type": "linear", "factor": 2.0, "partial_rotary_factor": 0.5})
    with pytest.raises(NotImplementedError, match="partial rotary"):
        rope_init(hf, "global")


def test_bad_layer_kind():
    with pytest.raises(ValueError, match="'global' or 'local'"):
        rope_init(CASES["default"], "sliding")
