"""Weights -> a runnable model: the native Transformer when the architecture is supported, else transformers."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import torch

from .config import ModelConfig, shape
from .transformer import Transformer, convert_hf_state_dict

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def parse_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None:  # float32 is exact on the CPU; bf16 is what GPUs are fast at
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of float32, bfloat16, float16")
    return DTYPES[dtype]


def parse_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f"unknown device {device!r}; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but no CUDA GPU is available here; use --device cpu")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"unsupported device {device!r}; use cpu, cuda or cuda:N")
    return dev


def read_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors weights in {folder}")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(f)))
    return state


def fill_random(name: str, p: torch.Tensor, config: ModelConfig, g: torch.Generator) -> None:
    """The seeded random value of parameter `name` (`random:` models; in parameter order, from one generator)."""
    if "norm" in name:
        p.fill_(0.0 if config.gemma_norms else 1.0)
    else:
        p.normal_(0.0, 0.02, generator=g)


def build_native(config: ModelConfig, state: dict[str, torch.Tensor] | None, device: torch.device,
                 dtype: torch.dtype, seed: int = 0) -> Transformer:
    """Instantiate without a throwaway random init, then load `state` (or seeded random weights if None)."""
    with torch.device("meta"):
        model = Transformer(config)
    if state is None:
        model = model.to_empty(device=device).to(dtype)
        g = torch.Generator(device=device).manual_seed(seed)
        with torch.no_grad():
            for name, p in model.named_parameters():
                fill_random(name, p, config, g)
    else:
        converted = {k: v.to(device=device, dtype=dtype) for k, v in convert_hf_state_dict(state, config).items()}
        model.load_state_dict(converted, strict=True, assign=True)
        if config.tie_word_embeddings:
            model.lm_head.weight = model.embed.weight
    return model.eval()


def load_random(spec: str, device: torch.device, dtype: torch.dtype, build: Callable = build_native):
    """`random:<shape>[@seed]`: a known shape with seeded random weights and the byte-level stand-in tokenizer.
    `build` makes the model from (config, state, device, dtype, seed): `build_native`, or a rank's shard."""
    from .tokenizer import ByteTokenizer

    name, _, seed = spec.partition("@")
    config = shape(name)
    model = build(config, None, device, dtype, seed=int(seed or 0))
    return model, ByteTokenizer(vocab_size=config.vocab_size)


# Sampling fields of generation_config.json that transformers applies only when do_sample is true.
SAMPLED_FIELDS = ("temperature", "top_k", "top_p", "min_p", "typical_p", "epsilon_cutoff", "eta_cutoff")
OFF = {"top_k": 0, "top_p": 1.0, "typical_p": 1.0, "epsilon_cutoff": 0.0, "eta_cutoff": 0.0, "repetition_penalty": 1.0}


def generation_config(folder: Path) -> tuple[list[int], dict[str, Any]]:
    """EOS ids of `folder`'s generation_config.json, and the sampling values transformers' `generate` would apply
    when the caller passes none, in SamplingConfig's terms (empty without the file).

    transformers samples only when do_sample is true: then the file's temperature, top_k, ... apply, and what it
    leaves unset takes transformers' global defaults (temperature 1, top_k 50); otherwise decoding is greedy whatever
    temperature says. The repetition penalty applies either way. Values that change nothing are left out.
    """
    if not (folder / "generation_config.json").is_file():
        return [], {}
    from transformers import GenerationConfig

    gen = GenerationConfig.from_pretrained(str(folder))
    eos = gen.eos_token_id if isinstance(gen.eos_token_id, list) else [gen.eos_token_id]
    values: dict[str, Any] = {}
    if gen.do_sample:
        fallback = GenerationConfig._get_default_generation_params()
        values = {k: getattr(gen, k) if getattr(gen, k) is not None else fallback.get(k) for k in SAMPLED_FIELDS}
    values["repetition_penalty"] = gen.repetition_penalty
    defaults = {k: v for k, v in values.items() if v is not None and OFF.get(k) != v}
    return [int(e) for e in eos if e is not None], defaults


def load_folder(folder: Path, device: torch.device, dtype: torch.dtype, build: Callable = build_native):
    """(model, tokenizer, generation defaults): the model's EOS ids include those of its tokenizer and of its
    generation_config.json, whose default sampling values come back as a dict (see `generation_config`). `build`
    makes a native model from (config, state, device, dtype), as in `load_random`."""
    from transformers import AutoTokenizer

    hf_config = json.loads((folder / "config.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    try:
        config = ModelConfig.from_hf(hf_config)
    except NotImplementedError:
        from .hf_fallback import HFModel

        model = HFModel.from_folder(folder, device, dtype)
    else:
        model = build(config, read_state_dict(folder), device, dtype)
    eos, defaults = generation_config(folder)
    eos_ids = model.config.eos_token_ids
    for e in [*eos, getattr(tokenizer, "eos_token_id", None)]:
        if e is not None and e not in eos_ids:
            eos_ids.append(e)
    return model, tokenizer, defaults
