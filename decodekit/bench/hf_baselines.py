"""External anchors for `decodekit bench`: transformers' own `generate` on the same weights and prompts."""
from __future__ import annotations

import torch

from .datasets import BenchPrompt


def hf_model(engine):
    """transformers' model for the engine's weights, loaded once and kept on the engine."""
    if getattr(engine, "_hf_model", None) is None:
        from transformers import AutoModelForCausalLM

        if engine.source_folder is None:
            raise ValueError(f"transformers baselines need a model loaded from files, not {engine.name}")
        engine._hf_model = AutoModelForCausalLM.from_pretrained(
            str(engine.source_folder), dtype=engine.model.dtype).to(engine.device).eval()
    return engine._hf_model


def hf_generate(engine, kind: str, prompt: BenchPrompt, max_new_tokens: int) -> list[int]:
    """Greedy `generate` with the dynamic cache (`hf`) or with prompt lookup, 10 tokens (`hf-pld`)."""
    model = hf_model(engine)
    ids = torch.tensor([engine.encode(prompt.prompt, chat=True)], device=engine.device)
    extra = {"prompt_lookup_num_tokens": 10} if kind == "hf-pld" else {}
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=engine.tokenizer.eos_token_id, **extra)
    return out[0, ids.shape[1]:].tolist()
