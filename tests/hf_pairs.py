"""A transformers model with random weights and decodekit's native copy of it: the oracle pair of many tests."""
from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from decodekit.models.config import ModelConfig, shape
from decodekit.models.transformer import Transformer, convert_hf_state_dict


def make_pair(name: str, seed: int = 0, scale: float = 0.05):
    """Weights (norms too) drawn at random, matrices with std `scale` (larger: more peaked distributions)."""
    config = shape(name)
    hf_config = AutoConfig.for_model(**config.to_hf())
    torch.manual_seed(seed)
    ref = AutoModelForCausalLM.from_config(hf_config, attn_implementation="eager").float().eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0, 0.3 if p.dim() == 1 else scale)
    assert ModelConfig.from_hf(hf_config.to_dict()) == config
    model = Transformer(config).eval()
    model.load_state_dict(convert_hf_state_dict(ref.state_dict(), config), strict=True)
    return ref, model
