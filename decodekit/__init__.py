"""decodekit: every decoding method that matters, behind one API, on real models, fast, measured honestly."""
from __future__ import annotations

import torch

from .engine import Engine, GenerationResult, GenerationStats
from .sampling import SamplingConfig

DEFAULT_MODEL = "smollm2"

__all__ = ["load", "Engine", "GenerationResult", "GenerationStats", "SamplingConfig", "DEFAULT_MODEL"]
__version__ = "0.1.0"


def load(source: str = DEFAULT_MODEL, device: str | torch.device | None = None,
         dtype: str | torch.dtype | None = None, max_context: int | None = None, progress: bool = True,
         cuda_graphs: bool | None = None, compile: bool | None = None, tensor_parallel: int | None = None,
         **engine_options) -> Engine:
    """Load a model into an Engine.

    `source`: a built-in name (`smollm2`, `gemma3-270m`), a local Hugging Face folder, a `.gguf` file, a hub id
    already in the local Hugging Face cache, or `random:<shape>` (`random:llama3-8b`, `random:tiny-llama`, ...).
    `device` defaults to cuda when available; `dtype` to float32 on the CPU and bfloat16 on the GPU.
    `cuda_graphs` (default: on for the native runtime on a GPU) replays decode and verify steps as CUDA graphs.
    `compile` (default: with CUDA graphs) fuses each block's kernels with torch.compile before the graphs are
    captured; the first generation then waits for compilation (10-25 s on an H100).
    `tensor_parallel=N` splits the model over N processes (one GPU each, from `device` on; or N CPU processes),
    started here, or the N ranks of `torchrun` (where ranks > 0 serve rank 0 inside this call and exit when it is
    done): see docs/tensor-parallel.md. `engine.model.close()` stops them (also done at exit).
    """
    from .models.loader import load_folder, load_random, parse_device, parse_dtype

    dev = parse_device(device)
    dt = parse_dtype(dtype, dev)
    folder, defaults = None, {}
    if tensor_parallel is not None and tensor_parallel != 1:
        from .engine.tp import load_parallel

        model, tokenizer, folder, defaults = load_parallel(source, dev, dt, tensor_parallel, progress)
        dev = model.device
    elif source.startswith("random:"):
        model, tokenizer = load_random(source.removeprefix("random:"), dev, dt)
    else:
        from .models.sources import resolve

        folder = resolve(source, progress=progress)
        model, tokenizer, defaults = load_folder(folder, dev, dt)
    from .models.transformer import Transformer

    native = isinstance(model, Transformer) or tensor_parallel not in (None, 1)
    if cuda_graphs is None:
        cuda_graphs = dev.type == "cuda" and native
    if cuda_graphs:
        if dev.type != "cuda" or not native:
            raise ValueError("cuda_graphs needs a CUDA device and a natively supported model")
        if compile or compile is None:
            model.compile_blocks()
    engine = Engine(model, tokenizer, name=source, max_context=max_context, cuda_graphs=cuda_graphs,
                    **engine_options)
    engine.source_folder = folder
    engine.generation_defaults = defaults  # generation_config.json's sampling values
    return engine
