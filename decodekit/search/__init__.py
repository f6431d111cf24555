"""Search and quality strategies over whole sequences: `engine.generate(prompt, n, search=NAME, **knobs)`.

One file per strategy, each a registered dataclass of knobs naming its paper (base.py: the registry and the two
shapes, policies and n-sample selection).
"""
from . import beam, best_first_beam, contrastive, diverse_beam, dola, momentum, patience_beam  # noqa: F401  (registers)
from .base import SEARCHES, SearchResult, SearchStrategy, make_search, register, search_knobs

__all__ = ["SEARCHES", "SearchResult", "SearchStrategy", "make_search", "register", "search_knobs"]
