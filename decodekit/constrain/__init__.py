"""Constrained decoding: specs, grammar backends (llguidance, xgrammar), tree masks, AWRS, and what a constrained
sequence brings to the engine's step (`state.SequenceConstraint`).

    engine.generate(prompt, 128, json_schema=SCHEMA)        # or regex=, grammar=, choice=, response_format=
    spec = constraint_spec(json_schema=SCHEMA)              # below the engine:
    compiler = ConstraintCompiler(tokenizer, eos_ids, vocab_size)   # one per engine; caches compiled grammars
    matcher = compiler.compile(spec).matcher()              # one per sequence
"""
from .awrs import AWRS, AWRSResult, awrs_sample, masked_probs
from .base import (BACKENDS, DEFAULT_BACKEND, ConstraintCompiler, Grammar, Matcher, allocate_bitmask,
                   apply_bitmask_, pack_bitmask, unpack_bitmask)
from .spec import ConstraintSpec, constraint_spec
from .tree import prune, prune_tree, tree_bitmask, tree_masks, walk_tree

__all__ = ["AWRS", "AWRSResult", "awrs_sample", "masked_probs", "BACKENDS", "DEFAULT_BACKEND", "ConstraintCompiler",
           "Grammar", "Matcher", "allocate_bitmask", "apply_bitmask_", "pack_bitmask",
           "unpack_bitmask", "ConstraintSpec",
           "constraint_spec", "prune", "prune_tree", "tree_bitmask", "tree_masks", "walk_tree"]
