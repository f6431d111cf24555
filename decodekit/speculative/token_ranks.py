"""Token ids ranked by frequency, for drafting over a frequent subset of the vocabulary (Zhao et al. 2025, FR-Spec:
Accelerating Large-Vocabulary Language Models via Frequency-Ranked Speculative Sampling).

A trained head's draft rounds are dominated by the target's LM head on large vocabularies (Llama-3-8B: 1 GB read
per round); drafting over the `N` most frequent tokens reads `N` rows of it instead, and the target's verification
keeps the output exact. The ranking is a file beside the head's weights (`token_ranks.safetensors`: `ranks`, int32,
every token id once, most frequent first), counted on a text corpus with the target's tokenizer
(`bench/token_ranks.py`). The tokenizer's special ids (EOS among them) rank first, so every subset can end a sequence.
"""
from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch

RANKS_FILE = "token_ranks.safetensors"


def special_ids(tokenizer, eos_ids: Iterable[int] = ()) -> list[int]:
    """The tokenizer's special ids (and `eos_ids`, e.g. the model config's), which every draft subset keeps."""
    ids = [*getattr(tokenizer, "all_special_ids", []), *eos_ids]
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.append(tokenizer.eos_token_id)
    return list(dict.fromkeys(int(i) for i in ids))


def token_counts(tokenizer, texts: Iterable[str], vocab_size: int) -> torch.Tensor:
    """How often each of `vocab_size` ids occurs in `texts` (encoded without special tokens): float64 `[vocab_size]`."""
    ids = [i for text in texts for i in tokenizer.encode(text, add_special_tokens=False)]
    ids = torch.tensor(ids, dtype=torch.long)
    return torch.bincount(ids[ids < vocab_size], minlength=vocab_size).double()


def token_ranks(counts: torch.Tensor, keep: Iterable[int] = ()) -> torch.Tensor:
    """All token ids, most frequent (`counts`, `token_counts`) first; `keep` (special ids) rank before all of them,
    ties (unseen tokens, mostly) by id. Returns int64 `[vocab_size]`."""
    counts = counts.double().clone()
    counts[torch.tensor([i for i in keep if 0 <= i < counts.shape[0]], dtype=torch.long)] = float("inf")
    return counts.sort(descending=True, stable=True).indices


def save_token_ranks(ranks: torch.Tensor, folder: str | Path) -> Path:
    from safetensors.torch import save_file

    path = Path(folder) / RANKS_FILE
    save_file({"ranks": ranks.to(torch.int32).contiguous()}, str(path))
    return path


def read_token_ranks(folder: str | Path | None, vocab_size: int) -> torch.Tensor:
    """The ranking shipped in a head folder (int64 `[vocab_size]`); a clear error when there is none."""
    from safetensors.torch import load_file

    path = None if folder is None else Path(folder) / RANKS_FILE
    if path is None or not path.is_file():
        raise ValueError(f"draft_vocab needs a token ranking ({RANKS_FILE}) beside the head's weights; "
                         f"{folder or 'an untrained head'} has none (write one with bench/token_ranks.py)")
    ranks = load_file(str(path))["ranks"].long()
    if ranks.shape != (vocab_size,) or not torch.equal(ranks.sort().values, torch.arange(vocab_size)):
        raise ValueError(f"{path} must rank each of the target's {vocab_size} token ids once")
    return ranks
