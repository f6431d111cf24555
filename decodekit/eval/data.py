"""Where the evaluation data lives and how to read it (offline copies of public data sets, one folder each).

The folder is `--data-dir`, else `$DECODEKIT_DATA`, else `../shared/data` relative to the repository root (the
layout of the project's workspace); each task reads its own subfolder (`gsm8k/`, `humaneval/`, ...).
"""
from __future__ import annotations

import gzip
import json
import os
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]


def data_dir(override: str | os.PathLike | None = None) -> Path:
    """The data folder; a one-line FileNotFoundError naming where it looked when it is missing."""
    if override:
        path, how = Path(override), "--data-dir"
    elif os.environ.get("DECODEKIT_DATA"):
        path, how = Path(os.environ["DECODEKIT_DATA"]), "$DECODEKIT_DATA"
    else:
        path, how = REPO_ROOT.parent / "shared" / "data", "the default ../shared/data beside the repository"
    if not path.is_dir():
        raise FileNotFoundError(f"evaluation data folder not found: looked at {path} ({how}); "
                                "pass --data-dir or set DECODEKIT_DATA")
    return path


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Rows of a JSON-lines file (`.gz` read through gzip); a missing file or a bad line is a one-line error."""
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    opener = gzip.open if path.suffix == ".gz" else open
    rows = []
    with opener(path, "rt", encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not JSON ({e.msg})") from None
    return rows
