"""The processes of a tensor-parallel model: starting them, rank 0's messages to the others, and failure.

`TPGroup` is one rank's membership: the torch.distributed process group the model's collectives run on (NCCL on
GPUs, gloo on the CPU) and a gloo group for rank 0's messages (host tensors: a header `[op, length]`, then the
payload). Ranks come from `torchrun` (`from_env`, also multi-node: `torchrun --nnodes`) or are started here as
subprocesses of rank 0 (`launch`; each runs `worker_main` in a fresh interpreter, so nothing of the caller's
`__main__` is re-run).

A rank that dies must not leave the others waiting: gloo fails an operation as soon as a peer's connections close;
rank 0 watches the processes it started (and aborts the NCCL communicator, which would otherwise wait out its
timeout, when one exits), and turns any failure into a one-line `TPError` naming the rank that exited; workers
watch their parent and exit with a message when rank 0 is gone.
"""
from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from datetime import timedelta
from enum import IntEnum
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed as dist

TIMEOUT = timedelta(minutes=10)  # a collective of the model waits this long for a live but busy peer (compiling)
IDLE = timedelta(days=365)  # workers wait for rank 0's next message this long (an idle server is not a failure)
START_TIMEOUT = 600.0  # seconds for every started worker to reach the rendezvous


class Op(IntEnum):
    """What rank 0 asks the other ranks to do (the payload layouts are in engine/tp.py)."""

    STOP = 0  # leave the loop and exit
    FREE = 1  # drop these pools
    ROPE = 2  # ensure_rope(n)
    COMPILE = 3  # compile_blocks()
    POOL = 4  # make_pool(num_blocks, block_size) under an id
    FORWARD = 5  # one eager forward pass
    COPY = 6  # pool.copy_slots(src, dst)
    PASS = 7  # capture a static pass of the graph runner
    REPLAY = 8  # replay one (after copying its inputs, when rank 0 filled them anew)
    EMBED = 9  # the vocabulary-parallel embedding of these token ids (trained heads draft with it)
    HEAD = 10  # lm_head of hidden states of this shape, broadcast next on the model's group


class TPError(RuntimeError):
    """The tensor-parallel group failed (a rank exited); the model cannot be used any more."""


def torchrun_env() -> tuple[int, int, int] | None:
    """(rank, world size, local rank) when this process was started by torchrun (or any launcher that sets them)."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return None
    return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0))


def rank_device(device: torch.device, rank: int, world: int) -> torch.device:
    """Rank `rank`'s device: the CPU, or GPU `index + rank` (one GPU per rank)."""
    if device.type != "cuda":
        return device
    base = device.index or 0
    if base + world > torch.cuda.device_count():
        raise ValueError(f"tensor_parallel={world} needs {world} GPUs from cuda:{base} on; "
                         f"{torch.cuda.device_count()} visible")
    return torch.device("cuda", base + rank)


def first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0][:300] if lines else type(error).__name__


class TPGroup:
    def __init__(self, rank: int, world: int, device: torch.device, procs: list[subprocess.Popen] | None = None,
                 owns_group: bool = True) -> None:
        self.rank, self.world, self.device = rank, world, device
        self.procs = procs or []  # rank 0 in `launch` mode: the workers it started (rank i + 1)
        self.owns_group = owns_group
        self.control = dist.new_group(backend="gloo", timeout=IDLE)
        self.model_group = dist.group.WORLD
        self.backend = dist.get_backend()
        self.closed = False
        self.error: str | None = None
        self.freed: list[int] = []  # pools rank 0 dropped, announced with the next message
        self.header = torch.zeros(2, dtype=torch.long)
        if self.procs:
            threading.Thread(target=self._watch_workers, daemon=True, name="decodekit-tp-watch").start()

    # ---- starting ----------------------------------------------------------------------------------------------
    @classmethod
    def launch(cls, world: int, device: torch.device, worker_args: dict[str, Any]) -> "TPGroup":
        """Rank 0 of a new group: start ranks 1..world-1 as subprocesses, each running `worker_main` with
        `worker_args` (plus its rank and the rendezvous), and join them."""
        if dist.is_initialized():
            raise ValueError("this process already has a torch.distributed group (one tensor-parallel model per "
                             "process: close the other with engine.model.close(), or start under torchrun)")
        backend = "nccl" if device.type == "cuda" else "gloo"
        store = dist.TCPStore("127.0.0.1", 0, world, is_master=True, timeout=TIMEOUT, wait_for_workers=False)
        env = dict(os.environ)
        package_root = str(Path(__file__).resolve().parents[2])  # decodekit importable in the workers as here
        env["PYTHONPATH"] = os.pathsep.join([package_root, *filter(None, [env.get("PYTHONPATH")])])
        for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            env.pop(key, None)
        if "OMP_NUM_THREADS" not in env and device.type == "cpu":  # ranks share the cores
            env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // world))
        procs = []
        try:
            for rank in range(1, world):
                args = {**worker_args, "rank": rank, "world": world, "port": store.port, "backend": backend,
                        "device": str(rank_device(device, rank, world))}
                procs.append(subprocess.Popen(
                    [sys.executable, "-c", "from decodekit.engine.tp import worker_main; worker_main()",
                     json.dumps(args)], env=env))
            cls._await_workers(store, procs)
            dev = rank_device(device, 0, world)
            if dev.type == "cuda":
                torch.cuda.set_device(dev)
            dist.init_process_group(backend, store=store, rank=0, world_size=world, timeout=TIMEOUT,
                                    **({"device_id": dev} if dev.type == "cuda" else {}))
            return cls(0, world, dev, procs)
        except BaseException:
            for p in procs:
                p.kill()
            raise

    @staticmethod
    def _await_workers(store, procs: list[subprocess.Popen]) -> None:
        """Wait until every worker reached the rendezvous; one that exits first is a clear error, not a hang."""
        deadline = time.monotonic() + START_TIMEOUT
        for rank, p in enumerate(procs, start=1):
            while not store.check([f"ready/{rank}"]):
                if p.poll() is not None:
                    raise TPError(f"tensor-parallel rank {rank} exited with code {p.returncode} while starting "
                                  "(its error is printed above)")
                if time.monotonic() > deadline:
                    raise TPError(f"tensor-parallel rank {rank} did not start within {START_TIMEOUT:.0f} s")
                time.sleep(0.05)

    @classmethod
    def join(cls, args: dict[str, Any]) -> "TPGroup":
        """A worker started by `launch`."""
        rank, world, device = args["rank"], args["world"], torch.device(args["device"])
        store = dist.TCPStore("127.0.0.1", args["port"], world, is_master=False, timeout=TIMEOUT)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        store.set(f"ready/{rank}", "1")
        dist.init_process_group(args["backend"], store=store, rank=rank, world_size=world, timeout=TIMEOUT,
                                **({"device_id": device} if device.type == "cuda" else {}))
        group = cls(rank, world, device)
        parent = os.getppid()
        threading.Thread(target=group._watch_parent, args=(parent,), daemon=True, name="decodekit-tp-watch").start()
        return group

    @classmethod
    def from_env(cls, world: int, device: torch.device) -> "TPGroup":
        """This rank of a group started by torchrun (every rank runs the caller's script)."""
        rank, size, local = torchrun_env()
        if size != world:
            raise ValueError(f"tensor_parallel={world} but the launcher started {size} processes (WORLD_SIZE)")
        dev = torch.device("cuda", local) if device.type == "cuda" else device
        owns = not dist.is_initialized()
        if owns:
            if dev.type == "cuda":
                torch.cuda.set_device(dev)
            dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", rank=rank, world_size=world,
                                    timeout=TIMEOUT, **({"device_id": dev} if dev.type == "cuda" else {}))
        return cls(rank, world, dev, owns_group=owns)

    # ---- rank 0's messages ------------------------------------------------------------------------------------
    def send(self, op: int, payload: torch.Tensor | None = None) -> None:
        """Rank 0: one message to every other rank (call inside `guard`)."""
        if self.freed:
            freed, self.freed = self.freed, []
            self.send(Op.FREE, torch.tensor(freed, dtype=torch.long))
        n = 0 if payload is None else payload.numel()
        dist.broadcast(torch.tensor([op, n], dtype=torch.long), 0, group=self.control)
        if n:
            dist.broadcast(payload, 0, group=self.control)

    def recv(self) -> tuple[int, torch.Tensor]:
        """Workers: the next message (op, int64 payload)."""
        dist.broadcast(self.header, 0, group=self.control)
        op, n = self.header.tolist()
        payload = torch.empty(n, dtype=torch.long)
        if n:
            dist.broadcast(payload, 0, group=self.control)
        return op, payload

    def barrier(self) -> None:
        dist.barrier(group=self.control)

    @contextlib.contextmanager
    def guard(self) -> Iterator[None]:
        """Rank 0's work with the other ranks: refused once the group failed; any failure inside (a dead peer, or
        an error that leaves the ranks out of step) brings the group down and surfaces as one TPError."""
        if self.error is not None or self.closed:
            raise TPError(self.error or "the tensor-parallel model was closed")
        try:
            yield
        except BaseException as e:
            self.error = self._describe(e)
            self.close(stop_workers=False)
            raise TPError(self.error) from e

    def _describe(self, error: BaseException) -> str:
        for _ in range(20):  # the peer's exit status shortly follows its closed connections
            dead = [(i, p.returncode) for i, p in enumerate(self.procs, start=1) if p.poll() is not None]
            if dead or not self.procs:
                break
            time.sleep(0.1)
        else:
            dead = []
        if dead:
            ranks = ", ".join(f"rank {i} exited with code {code}" for i, code in dead)
            return f"tensor-parallel {ranks}; the model cannot be used any more (load it again)"
        return (f"tensor-parallel group failed ({type(error).__name__}: {first_line(error)}); the model cannot be "
                "used any more (load it again)")

    def forget_pool(self, pool_id: int) -> None:
        """A pool of rank 0 was dropped (called from its finalizer: only noted here, sent with the next message)."""
        self.freed.append(pool_id)

    # ---- failure and shutdown ------------------------------------------------------------------------------------
    def _watch_workers(self) -> None:
        while not self.closed:
            for rank, p in enumerate(self.procs, start=1):
                if p.poll() is not None and not self.closed:
                    print(f"decodekit: error: tensor-parallel rank {rank} exited with code {p.returncode}",
                          file=sys.stderr, flush=True)
                    if self.backend == "nccl":  # NCCL would wait out its timeout: unblock rank 0 now
                        with contextlib.suppress(Exception):
                            dist.distributed_c10d._abort_process_group()
                    return
            time.sleep(0.5)

    def _watch_parent(self, parent: int) -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        print(f"decodekit: tensor-parallel rank {self.rank}: rank 0 exited; exiting", file=sys.stderr, flush=True)
        os._exit(1)

    def close(self, stop_workers: bool = True) -> None:
        """Rank 0: tell the workers to exit, wait for them (kill the ones that do not), leave the process group."""
        if self.closed:
            return
        if stop_workers and self.error is None and self.rank == 0:
            with contextlib.suppress(Exception):
                self.send(Op.STOP)
        self.closed = True
        for p in self.procs:
            try:
                p.wait(timeout=30 if stop_workers and self.error is None else 2)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        if self.owns_group and dist.is_initialized():
            with contextlib.suppress(Exception):
                dist.destroy_process_group()

