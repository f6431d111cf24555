"""Rotary position embeddings (Su et al. 2021, RoFormer), with the scaling rules of transformers.

Parameters are not parsed by hand: transformers' config classes normalise both config formats (4.x `rope_scaling`,
`rope_local_base_freq`; 5.x `rope_parameters`, nested per layer type for Gemma 3), and its own initialisation
functions (`ROPE_INIT_FUNCTIONS`: linear, dynamic, yarn, longrope, llama3, ...) compute the inverse frequencies and
the attention scaling (yarn's and longrope's factor on cos and sin). Only the default rule is written here.

Two rules depend on the sequence length, which one static table cannot follow: dynamic NTK changes nothing within
`max_position_embeddings` and longrope uses its short factors up to `original_max_position_embeddings`; past those
lengths the table raises NotImplementedError rather than give other logits than transformers.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from transformers import PretrainedConfig

    from .config import ModelConfig

LAYER_TYPES = {"global": "full_attention", "local": "sliding_attention"}  # decodekit kind -> transformers layer type


def hf_config(hf: "dict[str, Any] | PretrainedConfig") -> "PretrainedConfig":
    """A transformers config from a `config.json` dict (transformers normalises the rope parameters on the way)."""
    from transformers import AutoConfig, PretrainedConfig

    return hf if isinstance(hf, PretrainedConfig) else AutoConfig.for_model(**hf)


def layer_rope(config: "PretrainedConfig", kind: str) -> tuple[dict[str, Any], str | None]:
    """The normalised rope parameters of layers of `kind` ("global" | "local"), and the transformers layer type
    to pass to its init functions (None when one set of parameters serves every layer)."""
    if kind not in LAYER_TYPES:
        raise ValueError(f"rope layer kind must be 'global' or 'local', got {kind!r}")
    params = dict(config.rope_parameters or {})
    nested = [t for t in LAYER_TYPES.values() if isinstance(params.get(t), dict)]
    if not nested:
        return params, None
    layer_type = LAYER_TYPES[kind] if LAYER_TYPES[kind] in nested else nested[0]
    return dict(params[layer_type]), layer_type


def default_inv_freq(theta: float, head_dim: int) -> torch.Tensor:
    """The original rule, written as transformers writes it (float32) so that tables agree to the bit."""
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))


def rope_init(hf: "dict[str, Any] | PretrainedConfig", kind: str = "global") -> tuple[torch.Tensor, float]:
    """Inverse frequencies `[head_dim / 2]` float32 and the factor on cos and sin, for layers of `kind`.

    `hf`: a transformers config dict or a `PretrainedConfig`. Raises NotImplementedError for rules the native
    runtime cannot follow (unknown types, partial rotary embeddings).
    """
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = hf_config(hf)
    params, layer_type = layer_rope(config, kind)
    rope_type = params.get("rope_type", params.get("type", "default"))
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if rope_type == "default":
        inv_freq, scaling = default_inv_freq(params.get("rope_theta", 10_000.0), head_dim), 1.0
    elif rope_type in ROPE_INIT_FUNCTIONS:
        inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](config, None, layer_type=layer_type)
    else:
        raise NotImplementedError(f"rope type {rope_type!r} is not supported by the native runtime "
                                  f"(supported: default, {', '.join(ROPE_INIT_FUNCTIONS)})")
    if 2 * inv_freq.numel() != head_dim:
        raise NotImplementedError(f"partial rotary embeddings ({2 * inv_freq.numel()} of {head_dim} head dims) are "
                                  "not supported by the native runtime")
    return inv_freq.float(), float(scaling)


def check_length(params: dict[str, Any], max_positions: int, max_len: int) -> None:
    """Refuse table lengths where a sequence-length-dependent rule would leave the rule at position 0."""
    rope_type = params.get("rope_type", params.get("type", "default"))
    if "dynamic" in rope_type and max_len > max_positions:
        raise NotImplementedError(f"dynamic NTK rope rescales past max_position_embeddings={max_positions}, which "
                                  f"the native runtime does not do; keep the context within {max_positions} tokens")
    original = params.get("original_max_position_embeddings")
    if rope_type == "longrope" and original is not None and max_len > original:
        raise NotImplementedError(f"longrope switches to its long factors past original_max_position_embeddings="
                                  f"{original}, which the native runtime does not do; keep the context within "
                                  f"{original} tokens (max_context={original}) or use a transformers model")


def rope_table(config: "ModelConfig", kind: str, max_len: int) -> torch.Tensor:
    """cos and sin (times the rule's attention scaling) of every position < `max_len` for layers of `kind`
    ("global" | "local"), stacked: `[2, max_len, head_dim]` float32."""
    params = config.rope_params(kind)
    if params.get("rope_type", "default") == "default":  # no transformers config to build (slow) for the common case
        inv_freq, scaling = default_inv_freq(params["rope_theta"], config.head_dim), 1.0
    else:
        hf = hf_config(config.to_hf())
        check_length(layer_rope(hf, kind)[0], config.max_position_embeddings, max_len)
        inv_freq, scaling = rope_init(hf, kind)
    freqs = torch.outer(torch.arange(max_len, dtype=torch.float32), inv_freq)
    emb = torch.cat([freqs, freqs], dim=-1)
    return torch.stack([emb.cos(), emb.sin()]) * scaling
