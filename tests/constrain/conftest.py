"""Shared fixtures: the real SmolLM2 tokenizer, the byte tokenizer of random models, one compiler per pair."""
from __future__ import annotations

import pytest
import torch

from decodekit.constrain import ConstraintCompiler
from decodekit.models.tokenizer import ByteTokenizer

from constrain_helpers import BACKENDS, BYTE_VOCAB, SMOL_EOS, SMOL_VOCAB


def pytest_collection_modifyitems(items):
    # Tests on the real tokenizer read the cached SmolLM2 folder (fetched once): mark them like other real-model tests.
    for item in items:
        if {"smol", "smol_tokenizer"} & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.real_model)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Small tensor ops on a loaded 2-core machine: one intra-op thread is ~50x faster than two fighting others."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def smol_tokenizer():
    from transformers import AutoTokenizer

    from decodekit.models.sources import resolve

    return AutoTokenizer.from_pretrained(resolve("smollm2", progress=False))


@pytest.fixture(scope="session")
def byte_tokenizer():
    return ByteTokenizer(BYTE_VOCAB)


@pytest.fixture(scope="session")
def _compilers():
    return {}


@pytest.fixture(scope="session")
def smol(smol_tokenizer, _compilers):
    """backend name -> ConstraintCompiler on the SmolLM2 tokenizer (the tokenizer binding is built once)."""
    for b in BACKENDS:
        _compilers.setdefault(("smol", b), ConstraintCompiler(smol_tokenizer, [SMOL_EOS], SMOL_VOCAB, backend=b))
    return {b: _compilers[("smol", b)] for b in BACKENDS}


@pytest.fixture(scope="session")
def byte(byte_tokenizer, _compilers):
    """backend name -> ConstraintCompiler on the ByteTokenizer (EOS id 2)."""
    for b in BACKENDS:
        _compilers.setdefault(("byte", b), ConstraintCompiler(byte_tokenizer, [2], BYTE_VOCAB, backend=b))
    return {b: _compilers[("byte", b)] for b in BACKENDS}
