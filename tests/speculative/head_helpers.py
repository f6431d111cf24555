"""Trained-head test helpers: untrained heads with every weight random, so that they draft non-trivial trees."""
from __future__ import annotations

import torch

from decodekit.speculative import DRAFTERS
from decodekit.speculative.heads_common import new_head, save_head

HEADS = ["eagle", "medusa", "hydra"]


def perturbed_head(arch: str, config, seed: int = 1):
    """An untrained head with every weight random (zero-initialized residual layers would draft trivially)."""
    head = new_head(DRAFTERS[arch].module, DRAFTERS[arch].module.default_config(config), seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in head.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return head


def saved_head(arch: str, config, folder, seed: int = 1) -> str:
    """`perturbed_head` written to `folder` in float32 (what `path=` reads); returns the folder."""
    head = perturbed_head(arch, config, seed)
    save_head(head, head.config, folder, dtype=torch.float32)
    return str(folder)
