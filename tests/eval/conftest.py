"""Shared fixtures: a small data folder in the layout of /work/shared/data, and one torch thread for tiny models."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from evaldata import write_data_dir


@pytest.fixture
def data_dir(tmp_path) -> Path:
    return write_data_dir(tmp_path / "data")


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run faster on one thread, and much faster on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
