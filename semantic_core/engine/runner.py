"""The runner: the only part of the engine loop that computes with MLX.

It executes a `StepPlan`: one decode step for every decode group (mlx-lm's `GenerationBatch`:
batched forward pass, per-sequence samplers and logits processors, end-of-turn tokens), then each
planned prefill chunk in its own forward pass, so a short prompt is never padded to a long one
(mlx-lm's `BatchGenerator` pads the prompts of a prefill batch to the longest, which on a CPU
doubles the cost of the chunk). What it computed, and what failed, comes back as a `StepResult`;
the engine turns that into events and bookkeeping.

It also holds the decode groups' batches: sequences join a group's batch when their prompt is done
(`join`), and leave it when they finish, are cancelled or preempted (`extract` gives their cache
back, `drop` does not).

BLAS threads: decode matmuls are matrix-vector sized, so BLAS worker threads cost more than they
bring (and spin against MLX's own thread on a small machine); prefill matmuls are large and scale
with cores. The thread count is switched only between the two phases, with MLX idle, because
changing it while MLX's stream thread is inside a BLAS call is not safe.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from semantic_core.engine.request import Sequence
from semantic_core.engine.scheduler import DecodeGroup, StepPlan
from semantic_core.engine.types import GenerationRequest
from semantic_core.model import kv


@dataclass
class StepResult:
    decoded: list[tuple[DecodeGroup, list[Any], float]] = field(default_factory=list)  # (group, responses, s)
    prefilled: list[tuple[Sequence, int, float]] = field(default_factory=list)  # (sequence, tokens, seconds)
    failed_groups: list[tuple[DecodeGroup, BaseException]] = field(default_factory=list)
    failed: list[tuple[Sequence, BaseException]] = field(default_factory=list)


SamplerKey = tuple[float, float, int, float]


class Runner:
    def __init__(self, model: Any, eos_token_ids: set[int], *, decode_threads: int, prefill_threads: int) -> None:
        from mlx_lm.generate import StopSequences

        self.model = model
        self._eos = StopSequences([(t,) for t in sorted(eos_token_ids)])
        self.batches: dict[int, Any] = {}  # decode group id -> GenerationBatch
        self._samplers: dict[SamplerKey, Any] = {}
        self._processors: dict[tuple[float, int], list[Any]] = {}
        self._decode_threads = decode_threads
        self._prefill_threads = prefill_threads
        self._blas_threads_now = 0

    # A step --------------------------------------------------------------------------------------

    def execute(self, plan: StepPlan) -> StepResult:
        result = StepResult()
        if plan.decode:
            self._blas_phase(self._decode_threads)
            for group in plan.decode:
                batch = self.batches.get(group.id)
                if batch is None or len(batch) == 0:
                    continue
                t0 = time.perf_counter()
                try:
                    responses = batch.next()
                except Exception as exc:  # the batch's state is unknown now: the engine fails the group
                    self.batches.pop(group.id, None)
                    result.failed_groups.append((group, exc))
                    continue
                result.decoded.append((group, responses, time.perf_counter() - t0))
        if plan.prefill:
            self._blas_phase(self._prefill_threads)
            for seq, n in plan.prefill:
                try:
                    result.prefilled.append((seq, n, self._prefill(seq, n)))
                except Exception as exc:
                    result.failed.append((seq, exc))
        return result

    def _prefill(self, seq: Sequence, n: int) -> float:
        import mlx.core as mx

        t0 = time.perf_counter()
        chunk = mx.array([seq.prompt[seq.cursor : seq.cursor + n]])
        self.model(chunk, cache=seq.kv)
        mx.eval([c.state for c in seq.kv or []])
        return time.perf_counter() - t0

    # Decode groups --------------------------------------------------------------------------------

    def join(self, group: DecodeGroup, seqs: list[Sequence]) -> float:
        """Put sequences whose prompt is done into the group's batch (made if new). Their caches move
        into the batch. Returns the seconds it took (the batch's first forward pass included)."""
        import mlx.core as mx
        from mlx_lm.generate import GenerationBatch

        t0 = time.perf_counter()
        caches = []
        for seq in seqs:
            assert seq.kv is not None
            caches.append(seq.kv)
        batch = GenerationBatch(
            self.model,
            [s.id for s in seqs],
            mx.array([s.prompt[-1] for s in seqs]),
            kv.merge(caches),
            [list(s.prompt[:-1]) for s in seqs],
            [self.sampler(s.request) for s in seqs],
            self._sampler((0.0, 1.0, 0, 0.0)),
            [self._all_processors(s.request) for s in seqs],
            [self._eos for _ in seqs],
            [max(s.max_tokens - len(s.generated), 1) for s in seqs],
        )
        for seq in seqs:
            seq.kv = None
        existing = self.batches.get(group.id)
        if existing is not None and len(existing) > 0:
            existing.extend(batch)
        else:
            self.batches[group.id] = batch
        mx.clear_cache()
        return time.perf_counter() - t0

    def extract(self, seq: Sequence) -> tuple[kv.Cache, list[int]]:
        """Take a sequence out of its batch: its cache and the tokens it holds."""
        batch = self.batches[seq.group] if seq.group is not None else None
        if batch is None or seq.id not in batch.uids:
            raise KeyError(f"sequence {seq.id} is in no decode batch")
        idx = batch.uids.index(seq.id)
        cache = batch.extract_cache(idx)
        tokens = list(batch.tokens[idx])
        batch.filter([i for i in range(len(batch.uids)) if i != idx])
        self._prune()
        return cache, tokens

    def drop(self, seq: Sequence) -> None:
        """Take a sequence out of its batch without reading its cache (it failed)."""
        batch = self.batches.get(seq.group) if seq.group is not None else None
        if batch is not None and seq.id in batch.uids:
            idx = batch.uids.index(seq.id)
            try:
                batch.filter([i for i in range(len(batch.uids)) if i != idx])
            except Exception:  # the batch is broken anyway: forget it
                self.batches.pop(seq.group, None)  # type: ignore[arg-type]
        self._prune()

    def _prune(self) -> None:
        """Forget emptied batches (never extend an empty one: its state is gone)."""
        self.batches = {gid: b for gid, b in self.batches.items() if len(b) > 0}

    def clear(self) -> None:
        self.batches = {}

    # Sampling --------------------------------------------------------------------------------------

    def sampler(self, request: GenerationRequest) -> Any:
        return self._sampler(
            (float(request.temperature), float(request.top_p), int(request.top_k), float(request.min_p))
        )

    def _sampler(self, key: SamplerKey) -> Any:
        """One sampler object per distinct setting, so a batch that shares settings samples in one call."""
        from mlx_lm.sample_utils import make_sampler

        if key not in self._samplers:
            temp, top_p, top_k, min_p = key
            self._samplers[key] = make_sampler(temp=temp, top_p=top_p if top_p < 1.0 else 0.0, top_k=top_k, min_p=min_p)
        return self._samplers[key]

    def _all_processors(self, request: GenerationRequest) -> list[Any]:
        """The shared processors, and a grammar's own copy for this sequence: it is made at every
        join, and replays what the sequence generated before (a preempted one resumes mid-answer)."""
        shared = self.processors(request)
        if request.constraint is None:
            return shared
        return [*shared, request.constraint.processor(len(request.tokens))]

    def processors(self, request: GenerationRequest) -> list[Any]:
        """mlx-lm's logits processors for the request (a repetition penalty), shared per setting."""
        if request.repetition_penalty in (None, 1.0):
            return []
        from mlx_lm.sample_utils import make_logits_processors

        key = (float(request.repetition_penalty or 1.0), int(request.repetition_context_size))
        if key not in self._processors:
            self._processors[key] = list(
                make_logits_processors(repetition_penalty=key[0], repetition_context_size=key[1])
            )
        return self._processors[key]

    # BLAS -------------------------------------------------------------------------------------------

    def _blas_phase(self, threads: int) -> None:
        if threads == self._blas_threads_now or threads < 1:
            return
        import mlx.core as mx

        from semantic_core.model.blas import set_blas_threads

        mx.synchronize()
        set_blas_threads(threads)
        self._blas_threads_now = threads
