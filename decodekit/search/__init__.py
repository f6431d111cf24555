"""Search and quality strategies over whole sequences: `engine.generate(prompt, n, search=NAME, **knobs)`.

One file per strategy, each a registered dataclass of knobs naming its paper (base.py: the registry and the two
shapes, policies and n-sample selection).
"""
from . import (adadec, arithmetic, beam, best_first_beam, best_of_n, contrastive, diverse_beam,  # noqa: F401
               dola, entropy_switch, exact_extract, mbr, momentum, patience_beam, quality_rerank,
               self_consistency)  # (each registers its strategy)
from .base import SEARCHES, SearchResult, SearchStrategy, make_search, register, search_knobs

__all__ = ["SEARCHES", "SearchResult", "SearchStrategy", "make_search", "register", "search_knobs"]
