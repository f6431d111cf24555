"""Tensor parallelism in the engine: rank 0 runs the engine unchanged over a `TPModel`; the other ranks mirror it.

Rank 0 owns the tokenizer, the loop, the scheduler, the drafters and sampling. Its model is a `TPModel`: the
engine (and any drafter that runs the target, e.g. layerskip) calls it as it calls a `Transformer`, and each call
that touches the model's state is first sent to the other ranks as a compact message, then run on rank 0's own
shard (`models/tp.py`); the workers (`run_worker`) run the same call on theirs, and the collectives inside the
forward pass meet. Messages name KV pools by id: `make_pool` makes the same pool on every rank, and rank 0's pools
(`MirroredPool`) repeat their slot copies (tree paths kept, forks) everywhere. Under CUDA graphs every rank
captures and replays the same static passes (`TPGraphRunner`): rank 0 sends the pass's input buffer, the workers
copy it into theirs and replay.
"""
from __future__ import annotations

import json
import sys
import weakref
from functools import partial
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..models.batch import ForwardBatch, Rows
from ..models.kv_cache import KVPool
from ..models.transformer import Transformer
from .graphs import GraphRunner, StaticPass
from .tp_group import Op, TPError, TPGroup, first_line, torchrun_env


# ---- messages: int64 payloads ----------------------------------------------------------------------------------
def pack(head: list[int], tensors: list[torch.Tensor] = ()) -> torch.Tensor:
    """`head` ints, then the tensors flattened (bools as 0/1), in one host int64 tensor (one copy from the device)."""
    out = torch.tensor(head, dtype=torch.long)
    if not tensors:
        return out
    body = torch.cat([t.reshape(-1).long() for t in tensors])
    return torch.cat([out, body.cpu()])


class Reader:
    def __init__(self, payload: torch.Tensor) -> None:
        self.data, self.at = payload, 0

    def take(self, n: int) -> torch.Tensor:
        self.at += n
        return self.data[self.at - n:self.at]

    def ints(self, n: int) -> list[int]:
        return self.take(n).tolist()

    def int(self) -> int:
        return self.ints(1)[0]


def encode_forward(pool_id: int, batch: ForwardBatch, skip_layers, compiled: bool) -> torch.Tensor:
    skip, hidden = sorted(skip_layers), list(batch.hidden_layers)
    n_logits = -1 if batch.logit_rows is None else batch.logit_rows.numel()
    head = [pool_id, int(compiled), len(skip), *skip, len(hidden), *hidden, batch.tokens.numel(), n_logits,
            len(batch.groups)]
    tensors = [batch.tokens, batch.positions, batch.write_slots]
    if batch.logit_rows is not None:
        tensors.append(batch.logit_rows)
    for g in batch.groups:
        head += [g.start, g.rows, g.width, g.slot_table.shape[1], int(g.tree is not None)]
        tensors += [g.ctx, g.slot_table] + ([g.tree] if g.tree is not None else [])
    return pack(head, tensors)


def decode_forward(payload: torch.Tensor, device: torch.device) -> tuple[int, ForwardBatch, frozenset, bool]:
    r = Reader(payload)
    pool_id, compiled = r.int(), bool(r.int())
    skip = frozenset(r.ints(r.int()))
    hidden = tuple(r.ints(r.int()))
    n, n_logits, n_groups = r.ints(3)
    shapes = [r.ints(5) for _ in range(n_groups)]
    data = Reader(r.data[r.at:].to(device))  # one copy to the device; the tensors are views of it
    tokens, positions, slots = data.take(n), data.take(n), data.take(n)
    logit_rows = data.take(n_logits) if n_logits >= 0 else None
    groups = []
    for start, rows, width, length, has_tree in shapes:
        ctx, table = data.take(rows), data.take(rows * length).view(rows, length)
        tree = data.take(rows * width * width).view(rows, width, width).bool() if has_tree else None
        groups.append(Rows(start, rows, width, table, ctx, tree))
    return pool_id, ForwardBatch(tokens, positions, slots, groups, logit_rows, hidden), skip, compiled


# ---- rank 0 ----------------------------------------------------------------------------------------------------
class MirroredPool(KVPool):
    """Rank 0's KV pool of a tensor-parallel model (its local KV heads): slot copies happen on every rank."""

    def __init__(self, group: TPGroup, pool_id: int, *args) -> None:
        super().__init__(*args)
        self.group, self.pool_id = group, pool_id
        weakref.finalize(self, group.forget_pool, pool_id)

    def copy_slots(self, src, dst) -> None:
        src = torch.as_tensor(src, dtype=torch.long)
        dst = torch.as_tensor(dst, dtype=torch.long)
        with self.group.guard():
            self.group.send(Op.COPY, pack([self.pool_id, src.numel()], [src, dst]))
            super().copy_slots(src, dst)


class MirroredEmbed:
    """`TPModel.embed`: the vocabulary-parallel embedding, looked up on every rank (its all-reduce meets)."""

    def __init__(self, model: "TPModel") -> None:
        self.model = model

    @property
    def weight(self) -> torch.Tensor:  # rank 0's rows (for dtype and device)
        return self.model.local.embed.weight

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        group = self.model.group
        with group.guard():
            group.send(Op.EMBED, pack([ids.dim(), *ids.shape], [ids]))
            return self.model.local.embed(ids)


class MirroredHead(MirroredEmbed):
    """`TPModel.lm_head`: the vocabulary-parallel output head on every rank; the hidden states go to the others on
    the model's group (device to device), the full logits come back gathered."""

    @property
    def weight(self) -> torch.Tensor:
        return self.model.local.lm_head.weight

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        group, local = self.model.group, self.model.local
        h = h.to(local.device, local.dtype).contiguous()
        with group.guard():
            group.send(Op.HEAD, pack(list(h.shape)))
            dist.broadcast(h, 0, group=group.model_group)
            return local.lm_head(h)


class TPModel(nn.Module):
    """Rank 0's model: a `Transformer` to the engine, its shard underneath, the other ranks in step.

    `config` is the shard's (local head counts, so the engine sizes its KV pool per rank). `close()` stops the
    workers (also done at exit)."""

    forward_seq = Transformer.forward_seq  # one sequence's pass: the same code, calling this model

    def __init__(self, local: Transformer, group: TPGroup) -> None:
        super().__init__()
        self.local, self.group = local, group
        self.config = local.config
        self.next_pool = 0
        # what trained heads share with the target (speculative/heads_common.Target): run on every rank
        self.embed, self.lm_head = MirroredEmbed(self), MirroredHead(self)

    @property
    def world(self) -> int:
        return self.group.world

    @property
    def layers(self) -> nn.ModuleList:
        return self.local.layers

    @property
    def device(self) -> torch.device:
        return self.local.device

    @property
    def dtype(self) -> torch.dtype:
        return self.local.dtype

    @property
    def norm(self) -> nn.Module:  # the final norm (replicated: no collective), for DoLa's early exits
        return self.local.norm

    @property
    def compiled_blocks(self):
        return self.local.compiled_blocks

    @property
    def rope_len(self) -> int:
        return self.local.rope_len

    def ensure_rope(self, positions: int) -> None:
        with self.group.guard():
            self.group.send(Op.ROPE, pack([positions]))
            self.local.ensure_rope(positions)

    def compile_blocks(self) -> None:
        with self.group.guard():
            self.group.send(Op.COMPILE)
            self.local.compile_blocks()

    def make_pool(self, num_blocks: int, block_size: int) -> MirroredPool:
        c = self.config
        pool_id, self.next_pool = self.next_pool, self.next_pool + 1
        with self.group.guard():
            self.group.send(Op.POOL, pack([pool_id, num_blocks, block_size]))
            return MirroredPool(self.group, pool_id, c.num_layers, num_blocks, block_size, c.num_kv_heads,
                                c.head_dim, self.dtype, self.device)

    def forward(self, batch: ForwardBatch, pool: KVPool, skip_layers: frozenset[int] | set[int] = frozenset(),
                compiled: bool = False):
        if not isinstance(pool, MirroredPool):
            raise ValueError("a tensor-parallel model runs on KV pools made by its make_pool()")
        with self.group.guard():
            self.group.send(Op.FORWARD, encode_forward(pool.pool_id, batch, skip_layers, compiled))
            return self.local(batch, pool, skip_layers, compiled)

    def close(self) -> None:
        """Stop the other ranks and leave the process group (the model cannot run afterwards)."""
        self.group.close()


class MirroredPass(StaticPass):
    """A static pass on rank 0: captured on every rank at once; each replay is announced (with the inputs when
    `fill` wrote new ones; a greedy chunk's later replays advance their buffers on the device by themselves)."""

    def __init__(self, runner: "TPGraphRunner", rows: int, width: int, length: int, steps: int = 0,
                 hidden: tuple[int, ...] = ()) -> None:
        self.filled = False
        self.key = [runner.pool.pool_id, rows, width, length, steps, len(hidden), *hidden]
        with runner.tp_group.guard():
            runner.tp_group.send(Op.PASS, pack(self.key))  # first: capture runs collectives on every rank
            super().__init__(runner, rows, width, length, steps, hidden)

    def fill(self, specs, tree: bool) -> list[int]:
        rows = super().fill(specs, tree)
        self.filled = True
        return rows

    def replay(self) -> None:
        inputs = ([self.host] + ([self.tree] if self.width > 1 else [])) if self.filled else []
        group = self.runner.tp_group
        with group.guard():
            group.send(Op.REPLAY, pack(self.key + [int(self.filled)], inputs))
            self.filled = False
            super().replay()


class TPGraphRunner(GraphRunner):
    """Rank 0's graph runner: its captured passes run rank 0's shard and are mirrored on every rank; eager passes
    go through the `TPModel` (and so are mirrored as forward messages)."""

    pass_class = MirroredPass
    drafts_on_device = False  # fused draft rounds are not mirrored to the other ranks: drafts go through the host
    regroups_rows = False  # nor are rows moved between passes on the device

    def __init__(self, model: TPModel, pool: MirroredPool) -> None:
        super().__init__(model, pool)
        self.graph_model = model.local
        self.tp_group = model.group  # (`group` is the runner's method that groups specs)


TPModel.graph_runner = TPGraphRunner  # what `Engine(cuda_graphs=True)` builds for this model


# ---- the other ranks ---------------------------------------------------------------------------------------------
def run_worker(model: Transformer, group: TPGroup) -> None:
    """Ranks > 0: do what rank 0 asks, on this rank's shard, until it says stop."""
    pools: dict[int, KVPool] = {}
    runners: dict[int, GraphRunner] = {}
    dev = model.device
    with torch.inference_mode():
        while True:
            op, payload = group.recv()
            if op == Op.STOP:
                return
            if op == Op.FREE:
                for pool_id in payload.tolist():
                    pools.pop(pool_id, None)
                    runners.pop(pool_id, None)
            elif op == Op.ROPE:
                model.ensure_rope(int(payload[0]))
            elif op == Op.COMPILE:
                model.compile_blocks()
            elif op == Op.POOL:
                pool_id, num_blocks, block_size = payload.tolist()
                pools[pool_id] = model.make_pool(num_blocks, block_size)
            elif op == Op.FORWARD:
                pool_id, batch, skip, compiled = decode_forward(payload, dev)
                model(batch, pools[pool_id], skip, compiled)
            elif op == Op.COPY:
                r = Reader(payload)
                pool_id, n = r.ints(2)
                pools[pool_id].copy_slots(r.take(n), r.take(n))
            elif op == Op.PASS:
                pool_id, rows, width, length, steps, _, *hidden = payload.tolist()
                if pool_id not in runners:
                    runners[pool_id] = GraphRunner(model, pools[pool_id])
                runners[pool_id]._pass(rows, width, length, steps, tuple(hidden))
            elif op == Op.REPLAY:
                r = Reader(payload)
                pool_id, *key = r.ints(6)
                key.append(tuple(r.ints(key.pop())))  # the hidden layers: their count, then the layers
                filled = r.int()
                static = runners[pool_id].passes[tuple(key)]
                if filled:
                    static.dev.copy_(r.take(static.dev.numel()).to(dev))
                    if static.width > 1:
                        static.tree.copy_(r.take(static.tree.numel()).view_as(static.tree).bool().to(dev))
                static.replay()
            elif op == Op.EMBED:
                r = Reader(payload)
                shape = r.ints(r.int())
                model.embed(r.take(payload.numel() - r.at).view(shape).to(dev))
            elif op == Op.HEAD:
                h = torch.empty(payload.tolist(), dtype=model.dtype, device=dev)
                dist.broadcast(h, 0, group=group.model_group)
                model.lm_head(h)
            else:
                raise RuntimeError(f"unknown message {op}")


def _build(source: str, folder, device: torch.device, dtype: torch.dtype, group: TPGroup):
    """This rank's shard (and rank 0's tokenizer and generation defaults)."""
    from ..models.loader import load_folder, load_random
    from ..models.tp import build_shard

    build = partial(build_shard, rank=group.rank, world=group.world, group=group.model_group)
    if folder is None:
        model, tokenizer = load_random(source.removeprefix("random:"), device, dtype, build=build)
        return model, tokenizer, {}
    return load_folder(folder, device, dtype, build=build)


def _config(source: str, folder):
    from ..models.config import ModelConfig, shape

    if folder is None:
        return shape(source.removeprefix("random:").partition("@")[0])
    try:
        return ModelConfig.from_hf(json.loads((folder / "config.json").read_text()))
    except NotImplementedError as e:
        raise ValueError(f"tensor parallelism needs a natively supported model ({e}; it would run through "
                         "transformers)") from None


def load_parallel(source: str, device: torch.device, dtype: torch.dtype, world: int, progress: bool = True):
    """Rank 0's (TPModel, tokenizer, folder, generation defaults) for `decodekit.load(..., tensor_parallel=world)`.

    Started by torchrun (RANK and WORLD_SIZE set): this process is one rank; ranks > 0 serve rank 0 here and exit
    when it is done (they never return). Otherwise ranks 1..world-1 are started here, on the CPU or on one GPU each
    from `device` on."""
    from ..models.sources import resolve
    from ..models.tp import check_world

    if world < 1:
        raise ValueError(f"tensor_parallel must be >= 1, got {world}")
    random = source.startswith("random:")
    env = torchrun_env()
    if env is None:
        folder = None if random else resolve(source, progress=progress)
        check_world(_config(source, folder), world, source)
        group = TPGroup.launch(world, device, {"source": source, "folder": folder and str(folder),
                                               "dtype": str(dtype).removeprefix("torch.")})
    else:
        group = TPGroup.from_env(world, device)
        folder = None
        if not random:  # rank 0 fetches (and converts) once, the others then find it cached
            if group.rank == 0:
                folder = resolve(source, progress=progress)
            group.barrier()
            if group.rank:
                folder = resolve(source, progress=False)
        check_world(_config(source, folder), world, source)
    try:
        model, tokenizer, defaults = _build(source, folder, group.device, dtype, group)
    except BaseException:
        group.close(stop_workers=False)
        raise
    if group.rank:
        _serve_and_exit(model, group)
    tp_model = TPModel(model, group)
    import atexit

    atexit.register(group.close)
    return tp_model, tokenizer, folder, defaults


def _serve_and_exit(model: Transformer, group: TPGroup) -> None:
    """A worker's life after loading: serve rank 0, then leave; a failure ends the process with one line."""
    import os

    try:
        run_worker(model, group)
    except BaseException as e:  # noqa: BLE001 - rank 0 gone, or a failure here: either way this rank is done
        reason = "lost rank 0 (it exited or failed)" if "closed" in str(e).lower() or "reset" in str(e).lower() \
            else f"{type(e).__name__}: {first_line(e)}"
        print(f"decodekit: tensor-parallel rank {group.rank}: {reason}; exiting", file=sys.stderr, flush=True)
        os._exit(1)
    group.closed = True
    if group.owns_group:
        import torch.distributed as dist

        dist.destroy_process_group()
    sys.exit(0)


def worker_main() -> None:
    """Entry of a worker started by `TPGroup.launch` (arguments: one JSON object in argv[1])."""
    from pathlib import Path

    args: dict[str, Any] = json.loads(sys.argv[1])
    group = TPGroup.join(args)
    folder = Path(args["folder"]) if args["folder"] else None
    try:
        model, _, _ = _build(args["source"], folder, group.device, getattr(torch, args["dtype"]), group)
    except BaseException as e:  # noqa: BLE001
        print(f"decodekit: tensor-parallel rank {group.rank}: loading failed: {type(e).__name__}: {first_line(e)}",
              file=sys.stderr, flush=True)
        import os

        os._exit(1)
    _serve_and_exit(model, group)


__all__ = ["TPModel", "TPGraphRunner", "TPError", "load_parallel", "run_worker", "worker_main"]
