"""Speculative decoding: drafters propose token trees, verifiers accept paths. One drafter, one file."""
from .base import DRAFTERS, DraftTree, Drafter, StepResult, make_drafter, register
from .verify import VERIFIERS, verify_greedy, verify_rsd, verify_specinfer

# Importing a drafter module registers it by name.
from . import aded, draft_model, layerskip, lookahead, pld, recycling, suffix  # noqa: E402,F401
from . import eagle, hydra, medusa  # noqa: E402,F401  (trained draft heads)

__all__ = ["DRAFTERS", "DraftTree", "Drafter", "StepResult", "make_drafter", "register", "VERIFIERS",
           "verify_greedy", "verify_rsd", "verify_specinfer"]
