"""Weights -> a runnable model: the native Transformer when the architecture is supported, else transformers."""
from __future__ import annotations

import json
from pathlib import Path

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
                if "norm" in name:
                    p.fill_(0.0 if config.gemma_norms else 1.0)
                else:
                    p.normal_(0.0, 0.02, generator=g)
    else:
        converted = {k: v.to(device=device, dtype=dtype) for k, v in convert_hf_state_dict(state, config).items()}
        model.load_state_dict(converted, strict=True, assign=True)
        if config.tie_word_embeddings:
            model.lm_head.weight = model.embed.weight
    return model.eval()


def load_random(spec: str, device: torch.device, dtype: torch.dtype):
    """`random:<shape>[@seed]`: a known shape with seeded random weights and the byte-level stand-in tokenizer."""
    from .tokenizer import ByteTokenizer

    name, _, seed = spec.partition("@")
    config = shape(name)
    model = build_native(config, None, device, dtype, seed=int(seed or 0))
    return model, ByteTokenizer(vocab_size=config.vocab_size)


def load_folder(folder: Path, device: torch.device, dtype: torch.dtype):
    from transformers import AutoTokenizer

    hf_config = json.loads((folder / "config.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    try:
        config = ModelConfig.from_hf(hf_config)
    except NotImplementedError:
        from .hf_fallback import HFModel

        return HFModel.from_folder(folder, device, dtype), tokenizer
    if getattr(tokenizer, "eos_token_id", None) is not None and tokenizer.eos_token_id not in config.eos_token_ids:
        config.eos_token_ids.append(tokenizer.eos_token_id)
    return build_native(config, read_state_dict(folder), device, dtype), tokenizer
