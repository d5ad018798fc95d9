"""One model over several processes: the engine in lockstep on every rank of an mx.distributed group.

The model is split by mlx-lm's pipeline parallelism (`model.model.pipeline(group)`: each rank holds
its share of the decoder layers and their KV caches; every forward pass hands the hidden state from
rank to rank and ends with an all-gather, so every rank computes the same logits). That asks every
rank to make the same forward passes, with the same shapes, in the same order. So every rank runs the
same engine, and rank 0, the only one that serves HTTP, hands the others what its engine thread takes
each loop turn (`Tick`: requests submitted, cancelled, agent operations, stop) before it applies them.
From the same inputs in the same order each rank's engine makes the same decisions (admission,
routing, eviction, preemption, sampling) and so the same forward passes:

- the store reads and writes files inline (no I/O thread whose timing could differ between ranks);
  each rank keeps its own layers' caches in its own folder (`<agent cache dir>/pp<rank>of<size>`);
- the pool is sized from the largest per-token KV size of any rank, so every rank has the same
  number of blocks;
- agent ids and sampling draw from generators seeded by rank 0; Python's string hashing (the order
  of sets) must agree: ranks run with one PYTHONHASHSEED (`semantic serve --ranks` sets it);
- a request whose answer follows a grammar (a forced tool call, a JSON schema) travels with the
  grammar's source, and each rank compiles it for its own sampler (a compiled matcher cannot travel).

What rank 0 hands over travels over the group itself (an all-sum of bytes from rank 0: a length,
then the payload), so no other transport is needed. Tensor parallelism (mlx-lm's `shard` for llama
and others) would use the same lockstep: only the loader's split differs.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import random
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from semantic_core.engine.constraints import Grammars
from semantic_core.engine.handle import RequestHandle
from semantic_core.engine.inbox import Call, Cancel, InboxItem, Op, Stop, Submit
from semantic_core.engine.types import GenerationRequest
from semantic_core.observability import get_logger

log = get_logger("semantic.distributed")


@dataclass
class Tick:
    """What rank 0's engine thread took from its inbox this loop turn, in order."""

    messages: list[tuple[Any, ...]] = field(default_factory=list)


class Distributed:
    def __init__(self, group: Any) -> None:
        self.group = group
        self.rank = int(group.rank())
        self.size = int(group.size())
        self._mirrors: dict[int, RequestHandle] = {}  # follower ranks: rank 0's handle id -> ours

    @property
    def leader(self) -> bool:
        return self.rank == 0

    def broadcast(self, payload: bytes = b"") -> bytes:
        """Rank 0's bytes on every rank (collective: every rank calls it, in the same order)."""
        import mlx.core as mx
        import numpy as np

        n = len(payload) if self.leader else 0
        total = mx.distributed.all_sum(mx.array([n], dtype=mx.int32), group=self.group, stream=mx.cpu)
        n = int(total.item())  # type: ignore[arg-type]
        if n == 0:
            return b""
        data = mx.array(np.frombuffer(payload, dtype=np.uint8)) if self.leader else mx.zeros((n,), dtype=mx.uint8)
        out = mx.distributed.all_sum(data, group=self.group, stream=mx.cpu)
        mx.eval(out)
        return payload if self.leader else bytes(np.array(out, copy=False))

    def tick(self, tick: Tick | None = None) -> Tick:
        """Rank 0 sends its tick; the others receive it."""
        raw = self.broadcast(pickle.dumps(tick) if self.leader else b"")
        received: Tick = pickle.loads(raw) if raw else Tick()
        return tick if (self.leader and tick is not None) else received

    def to_item(self, message: tuple[Any, ...], grammars: Grammars) -> InboxItem:
        """A follower's inbox item for one of rank 0's messages (see `to_message`)."""
        kind = message[0]
        if kind == "submit":
            request: GenerationRequest = message[2]
            if message[3] is not None:  # rank 0's grammar, compiled here for this rank's sampler
                request = dataclasses.replace(request, constraint=grammars.compile(*message[3]))
            handle = RequestHandle(request, None, lambda _h: None, listened=False)
            self._mirrors[message[1]] = handle
            return Submit(handle)
        if kind == "cancel":
            mirror = self._mirrors.pop(message[1], None)
            return Cancel(mirror) if mirror is not None else Call(lambda: None, Future())
        if kind == "op":
            return Op(message[1], message[2], message[3], None)
        return Stop(message[1])

    def max_int(self, value: int) -> int:
        """The largest of each rank's `value`."""
        import mlx.core as mx

        values = mx.distributed.all_gather(mx.array([value], dtype=mx.int64), group=self.group, stream=mx.cpu)
        return int(mx.max(values).item())  # type: ignore[arg-type]

    def shared_seed(self) -> int:
        """A seed rank 0 draws, the same on every rank."""
        seed = random.SystemRandom().randrange(1, 2**31 - 1) if self.leader else 0
        return int.from_bytes(self.broadcast(seed.to_bytes(8, "little") if self.leader else b""), "little")


def to_message(item: InboxItem) -> tuple[Any, ...]:
    """What a follower rank needs of one of rank 0's inbox items (no handles, futures or closures;
    a compiled grammar does not travel, its source does)."""
    if isinstance(item, Submit):
        request = item.handle.request
        constraint = request.constraint
        if constraint is None:
            return ("submit", item.handle.id, request, None)
        source = (constraint.grammar, constraint.what)
        return ("submit", item.handle.id, dataclasses.replace(request, constraint=None), source)
    if isinstance(item, Cancel):
        return ("cancel", item.handle.id)
    if isinstance(item, Op):
        return ("op", item.name, item.args, item.kwargs)
    assert isinstance(item, Stop)
    return ("stop", item.save)


def init_group(backend: str) -> Any:
    """Join the group this process was launched into (`semantic serve --ranks N`, mpirun or
    mlx.launch): MLX reads the rank and peers from the environment."""
    import mlx.core as mx

    if not os.environ.get("PYTHONHASHSEED"):
        raise RuntimeError(
            "distributed ranks must share PYTHONHASHSEED (set it to the same value for every rank; "
            "`semantic serve --ranks N` does)"
        )
    if not mx.distributed.is_available():
        raise RuntimeError("this MLX build has no distributed backend")
    group = mx.distributed.init(strict=True, backend=backend)
    log.info("joined the distributed group", rank=group.rank(), size=group.size(), backend=backend)
    return group


def finalize(backend: str, code: int) -> None:
    """End an MPI rank properly once its engine stopped, with exit status `code`: OpenMPI's mpirun
    counts a rank that exits without MPI_Finalize as failed and aborts the job, killing the other
    ranks wherever they are. MLX finalizes only if its group object happens to be destroyed at exit,
    so this finalizes, then leaves at once (everything is saved and flushed: no destructor may call
    MPI again). Other backends: nothing."""
    if backend != "mpi":
        return
    import ctypes
    import sys

    try:
        lib = ctypes.CDLL(os.environ.get("MLX_MPI_LIBNAME", "libmpi.so.40"), mode=os.RTLD_NOLOAD | ctypes.RTLD_GLOBAL)
    except OSError:
        return
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    done = ctypes.c_int(0)
    lib.MPI_Finalized(ctypes.byref(done))
    if not done.value:
        lib.MPI_Finalize()
    os._exit(code)
