"""Model shapes: one dataclass read from a Hugging Face config, and the named shapes of `random:<shape>`."""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from .rope import hf_config, layer_rope

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text")


def non_default(rope: dict[str, Any]) -> dict[str, Any] | None:
    """The scaling part of normalised rope parameters (all but rope_theta), None for the default rule."""
    if rope.get("rope_type", "default") == "default":
        return None
    return {k: v for k, v in rope.items() if k != "rope_theta"}


@dataclass
class ModelConfig:
    """Everything the runtime needs to know about a decoder-only transformer of the Llama or Gemma 3 family."""

    model_type: str = "llama"
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int = 32
    head_dim: int = 128
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # transformers' normalised rope parameters (rope_type, factor, ...; rope_theta aside) when not the default rule;
    # Gemma 3's sliding-window layers have their own (models/rope.py turns them into tables).
    rope_scaling: dict[str, Any] | None = None
    local_rope_theta: float = 10000.0  # Gemma 3: rope base of sliding-window layers
    local_rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 8192
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # Qwen2: biases on q, k, v
    qk_norm: bool = False  # Qwen3 and Gemma 3: RMSNorm over each head of q and k
    sliding_window: int | None = None
    layer_types: list[str] = field(default_factory=list)  # "full_attention" | "sliding_attention" per layer
    hidden_act: str = "silu"
    # Gemma-isms: norms scale by (1 + w), embeddings scale by sqrt(hidden), extra norms around the MLP.
    gemma_norms: bool = False
    embed_scale: float = 1.0
    attn_scale: float | None = None  # None -> head_dim ** -0.5
    final_logit_softcap: float | None = None
    bos_token_id: int | None = 1
    eos_token_ids: list[int] = field(default_factory=lambda: [2])

    def __post_init__(self) -> None:
        if not self.layer_types:
            self.layer_types = ["full_attention"] * self.num_layers

    @property
    def scale(self) -> float:
        return self.attn_scale if self.attn_scale is not None else self.head_dim**-0.5

    def rope_params(self, kind: str) -> dict[str, Any]:
        """transformers' rope parameters of layers of `kind`: "global", or "local" (Gemma 3's sliding layers)."""
        local = kind == "local" and self.model_type == "gemma3_text"
        scaling = self.local_rope_scaling if local else self.rope_scaling
        theta = self.local_rope_theta if local else self.rope_theta
        return {"rope_type": "default", **(scaling or {}), "rope_theta": theta}

    def layer_window(self, layer: int) -> int | None:
        return self.sliding_window if self.layer_types[layer] == "sliding_attention" else None

    def num_params(self) -> int:
        attn = self.hidden_size * self.head_dim * (2 * self.num_heads + 2 * self.num_kv_heads)
        mlp = 3 * self.hidden_size * self.intermediate_size
        emb = self.vocab_size * self.hidden_size * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * (attn + mlp) + emb

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> "ModelConfig":
        """Read a transformers `config.json` dict (transformers 4.x `rope_scaling` or 5.x `rope_parameters`)."""
        model_type = hf.get("model_type", "llama")
        if model_type == "gemma3":  # multimodal wrapper: the text model's config is nested
            hf, model_type = hf["text_config"], "gemma3_text"
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise NotImplementedError(f"no native runtime for model_type {model_type!r}")
        n_heads = hf["num_attention_heads"]
        head_dim = hf.get("head_dim") or hf["hidden_size"] // n_heads
        eos = hf.get("eos_token_id", 2)
        is_gemma = model_type == "gemma3_text"
        # transformers normalises both config formats (4.x rope_scaling, 5.x rope_parameters, nested for Gemma 3)
        normal = hf_config({**hf, "model_type": model_type})
        global_rope, local_rope = layer_rope(normal, "global")[0], layer_rope(normal, "local")[0]
        n_layers = hf["num_hidden_layers"]
        layer_types = hf.get("layer_types") or []
        sliding = hf.get("sliding_window")
        if not layer_types:
            if is_gemma:
                pattern = hf.get("sliding_window_pattern", 6)
                layer_types = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(n_layers)]
            elif sliding and hf.get("use_sliding_window", model_type == "mistral"):
                layer_types = ["sliding_attention"] * n_layers
        if not any(t == "sliding_attention" for t in layer_types):
            sliding = None
        return cls(
            model_type=model_type,
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=n_layers,
            num_heads=n_heads,
            num_kv_heads=hf.get("num_key_value_heads") or n_heads,
            head_dim=head_dim,
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=float(global_rope["rope_theta"]),
            rope_scaling=non_default(global_rope),
            local_rope_theta=float(local_rope["rope_theta"]),
            local_rope_scaling=non_default(local_rope),
            max_position_embeddings=hf.get("max_position_embeddings", 8192),
            tie_word_embeddings=hf.get("tie_word_embeddings", is_gemma),
            attention_bias=hf.get("attention_bias", model_type == "qwen2"),
            qk_norm=model_type in ("qwen3", "gemma3_text"),
            sliding_window=sliding,
            layer_types=layer_types,
            hidden_act=hf.get("hidden_activation") or hf.get("hidden_act", "silu"),
            gemma_norms=is_gemma,
            embed_scale=hf["hidden_size"] ** 0.5 if is_gemma else 1.0,
            attn_scale=hf.get("query_pre_attn_scalar", 256) ** -0.5 if is_gemma else None,
            final_logit_softcap=hf.get("final_logit_softcapping"),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=list(eos) if isinstance(eos, (list, tuple)) else [eos],
        )

    def to_hf(self) -> dict[str, Any]:
        """The transformers config dict of this shape (used to build reference models in tests)."""
        hf: dict[str, Any] = dict(
            model_type=self.model_type,
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            rms_norm_eps=self.rms_norm_eps,
            max_position_embeddings=self.max_position_embeddings,
            tie_word_embeddings=self.tie_word_embeddings,
            bos_token_id=self.bos_token_id,
            eos_token_id=self.eos_token_ids[0],
            pad_token_id=0,
        )
        if self.model_type == "gemma3_text":
            hf.update(
                rope_parameters={"full_attention": self.rope_params("global"),
                                 "sliding_attention": self.rope_params("local")},
                sliding_window=self.sliding_window,
                layer_types=self.layer_types,
                query_pre_attn_scalar=round(self.scale**-2),
                hidden_activation=self.hidden_act,
            )
        else:
            hf.update(rope_parameters=self.rope_params("global"), hidden_act=self.hidden_act,
                      attention_bias=self.attention_bias)
            if self.sliding_window:
                hf.update(sliding_window=self.sliding_window, use_sliding_window=True)
        return hf


# Named shapes for `random:<shape>`: seeded random weights of a real architecture, for speed and fast tests.
SHAPES: dict[str, ModelConfig] = {
    "llama3-8b": ModelConfig(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32, num_kv_heads=8,
        head_dim=128, rope_theta=500000.0, max_position_embeddings=131072, eos_token_ids=[128001],
        bos_token_id=128000,
    ),
    "llama3-70b": ModelConfig(  # for tensor-parallel benchmarks (bench/tp_bench.py): never built whole on one rank
        vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_layers=80, num_heads=64, num_kv_heads=8,
        head_dim=128, rope_theta=500000.0, max_position_embeddings=131072, eos_token_ids=[128001],
        bos_token_id=128000,
    ),
    "llama3.2-1b": ModelConfig(  # Llama 3.2 1B's shape (rope scaling left out): a draft model for llama3-8b
        vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_layers=16, num_heads=32, num_kv_heads=8,
        head_dim=64, rope_theta=500000.0, max_position_embeddings=131072, eos_token_ids=[128001],
        bos_token_id=128000, tie_word_embeddings=True,
    ),
    "smollm2-135m": ModelConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9, num_kv_heads=3,
        head_dim=64, rope_theta=100000.0, tie_word_embeddings=True,
    ),
    "gemma3-270m": ModelConfig(
        model_type="gemma3_text", vocab_size=262144, hidden_size=640, intermediate_size=2048, num_layers=18,
        num_heads=4, num_kv_heads=1, head_dim=256, qk_norm=True, gemma_norms=True, embed_scale=640**0.5,
        attn_scale=256**-0.5, sliding_window=512, rms_norm_eps=1e-6, hidden_act="gelu_pytorch_tanh",
        layer_types=["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(18)],
        rope_theta=1_000_000.0, local_rope_theta=10_000.0, tie_word_embeddings=True, max_position_embeddings=32768,
        eos_token_ids=[1, 106], bos_token_id=2,
    ),
    "tiny-llama": ModelConfig(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
        head_dim=16, max_position_embeddings=2048,
    ),
    "tiny-qwen2": ModelConfig(
        model_type="qwen2", vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
        num_kv_heads=2, head_dim=16, attention_bias=True, max_position_embeddings=2048, tie_word_embeddings=True,
    ),
    "tiny-qwen3": ModelConfig(
        model_type="qwen3", vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
        num_kv_heads=2, head_dim=16, qk_norm=True, max_position_embeddings=2048,
    ),
    "tiny-gemma3": ModelConfig(
        model_type="gemma3_text", vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=4, num_heads=4,
        num_kv_heads=2, head_dim=16, qk_norm=True, gemma_norms=True, embed_scale=64**0.5, attn_scale=16**-0.5,
        sliding_window=8, layer_types=["sliding_attention"] * 3 + ["full_attention"], hidden_act="gelu_pytorch_tanh",
        rope_theta=1_000_000.0, local_rope_theta=10_000.0, tie_word_embeddings=True, max_position_embeddings=2048,
    ),
}


def shape(name: str) -> ModelConfig:
    """A known shape by name; `NAME:layers=N` keeps its first N layers (e.g. `llama3-8b:layers=1`, the cost of a
    one-layer draft head of that shape, for trace replays)."""
    base, _, override = name.partition(":")
    if base not in SHAPES:
        raise ValueError(f"unknown random shape {base!r}; known: {', '.join(SHAPES)}")
    config = replace(SHAPES[base])
    if override:
        key, eq, value = override.partition("=")
        if key != "layers" or not eq or not value.isdigit() or not 1 <= int(value) <= config.num_layers:
            raise ValueError(f"random shape {name!r}: the one override is layers=N, 1 <= N <= {config.num_layers}")
        n = int(value)
        config = replace(config, num_layers=n, layer_types=config.layer_types[:n])
    return config
