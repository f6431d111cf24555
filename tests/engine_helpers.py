"""Helpers shared by the engine tests (and the drafter tests that drive the engine)."""
from dataclasses import dataclass

from decodekit.engine import Engine
from decodekit.kv import PackedKV, QuantPress, register


@register
@dataclass
class ExactPress(QuantPress):
    """A "quantizer" that keeps keys and values as they are (press "test_exact"): the packed-blocks mechanism
    alone, so that tests can ask for the exact tokens of an uncompressed run."""

    name = "test_exact"

    def pack(self, keys, values):
        return PackedKV({"k": keys.clone(), "v": values.clone()}, {})

    def unpack(self, packed):
        return packed.tensors["k"], packed.tensors["v"]


def fused_engine(engine, sizes=(16, 4)) -> Engine:
    """An engine whose runner offers fused greedy chunks on the CPU (the eager reference of what CUDA graphs replay
    on a GPU), recording each call as (chunks, steps), so the engine's use of chunks is tested where CI runs."""
    fused = Engine(engine.model, engine.tokenizer)
    runner = fused.core.runner
    runner.fused_sizes = sizes
    runner.chunk_calls = []
    inner = runner.greedy_chunks

    def record(kvs, roots, positions, steps, chunks, **kw):
        runner.chunk_calls.append((chunks, steps))
        return inner(kvs, roots, positions, steps, chunks, **kw)

    runner.greedy_chunks = record
    return fused
