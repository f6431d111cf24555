"""Options that make every registered drafter runnable on any test model."""
from __future__ import annotations

HEADS = ("eagle", "medusa", "hydra")


def drafter_options(method: str, engine) -> dict:
    """Model-based drafters draft with the target's own weights (a cheap, high-acceptance stand-in); trained heads use
    the head shipped for the model, or an untrained one where none ships (tiny and micro models)."""
    if method in HEADS:
        return {"init": "trained-or-random"}
    return {"model": engine} if method == "draft" else {}
