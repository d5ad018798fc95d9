"""The life of a sequence in the engine, from admission to its answer: starting it on its agent's
cache, each token it generates (text, stops, the end of the turn), making room for it (preempting
another when memory is short), finishing it (the turn written into its agent's record and made
durable before its caller hears of it), cancelling it, and failing it alone when something goes
wrong while it is served.

Every method runs on the engine thread. The engine's loop calls them from its update step; the
parts they move between (scheduler, admission, residency, store, runner) are passed in.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from semantic_core.agents.agent import Agent
from semantic_core.agents.store import AgentStore
from semantic_core.engine.admission import Admission
from semantic_core.engine.handle import RequestHandle
from semantic_core.engine.operations import AgentOperations
from semantic_core.engine.output import TextOutput
from semantic_core.engine.request import Phase, Sequence
from semantic_core.engine.residency import Residency
from semantic_core.engine.runner import Runner
from semantic_core.engine.scheduler import Scheduler
from semantic_core.engine.snapshot import Publisher
from semantic_core.engine.types import (
    Failed,
    Finished,
    GenerationResult,
    Started,
    StopReason,
    TextDelta,
    Usage,
)
from semantic_core.errors import EngineFault, EngineStopped, PoolExhausted, SemanticError, StorageError
from semantic_core.model import kv
from semantic_core.observability import Metrics, get_logger

log = get_logger("semantic.engine")


class Lifecycle:
    def __init__(
        self,
        *,
        scheduler: Scheduler,
        admission: Admission,
        residency: Residency,
        store: AgentStore,
        runner: Runner,
        ops: AgentOperations,
        publisher: Publisher,
        metrics: Metrics,
        detok_factory: Callable[[], Any],
        context_length: int,
        save_on_finish: bool,
        wake: Callable[[], None],
    ) -> None:
        self.scheduler = scheduler
        self.admission = admission
        self.residency = residency
        self.store = store
        self.runner = runner
        self.ops = ops
        self.publisher = publisher
        self.metrics = metrics
        self.detok_factory = detok_factory
        self.context_length = context_length
        self.save_on_finish = save_on_finish
        self.wake = wake
        # Finished sequences whose turn is being made durable before the caller hears of it.
        self.finishing: list[tuple[Sequence, GenerationResult, Future[Any], float]] = []

    def start(self, seq: Sequence) -> None:
        """An admitted sequence: its agent's cache is lent to it, its output set up."""
        assert seq.agent_id is not None
        agent = self.store.get(seq.agent_id)
        req = seq.request
        seq.timing.admitted = time.monotonic()
        seq.kv = self.residency.lend(agent.id)
        seq.cursor = seq.cached
        if seq.preempted:
            return  # it keeps its output state, usage and events
        seq.output = TextOutput(self.detok_factory(), req.stop_sequences)
        seq.max_tokens = min(req.max_tokens, self.context_length - len(req.tokens))
        reused, computed = seq.cached, len(req.tokens) - seq.cached
        seq.prompt_tokens, seq.reused_tokens = len(req.tokens), reused
        self.publisher.tokens_reused += reused
        self.publisher.tokens_computed += computed
        agent.reused_tokens += reused
        agent.computed_tokens += computed
        self.metrics.tokens.labels("reused").inc(reused)
        self.metrics.cache_hits.labels("hit" if reused > 0 else "miss").inc()
        seq.handle.deliver(Started(agent.id, len(req.tokens), reused, seq.created_agent, seq.diverged_from))

    def ensure_decode_room(self, seq: Sequence) -> None:
        assert seq.agent_id is not None
        agent = self.store.get(seq.agent_id)
        protect = self.scheduler.running_agents()
        while True:
            try:
                self.residency.ensure(agent, seq.cache_tokens + 1, protect=protect)
                return
            except PoolExhausted:
                victim = self.scheduler.preemption_victim(exclude=seq)
                if victim is None:
                    log.warning(
                        "KV budget full: stopping the only running sequence early",
                        agent=agent.id,
                        tokens=seq.cache_tokens,
                    )
                    self.finish_from_batch(seq, "max_tokens", None)
                    return
                self.preempt(victim)

    def preempt(self, seq: Sequence) -> None:
        """Make room by saving a running sequence to disk; it resumes from there later."""
        assert seq.agent_id is not None
        agent = self.store.get(seq.agent_id)
        cache, tokens = self.runner.extract(seq)
        self.scheduler.remove(seq)
        self.residency.settle(agent, cache, tokens)
        log.info("preempting a sequence to free KV blocks", agent=agent.id, tokens=len(tokens))
        try:
            self.residency.evict(agent, reason="preempt")
        except StorageError as exc:
            # It cannot be parked on disk: end its answer here rather than lose what it has.
            log.error("could not preempt a sequence; stopping it early", agent=agent.id, error=str(exc))
            self.residency.lend(agent.id)
            self.finish(seq, "max_tokens", None, cache, tokens)
            return
        seq.preempted = True
        # Resume: the cache holds every token so far; the last one is fed again for its logits.
        seq.prompt = list(tokens)
        self.scheduler.resume_first(seq)

    def on_token(self, seq: Sequence, r: Any) -> None:
        assert seq.output is not None
        now = time.monotonic()
        if seq.timing.first_token is None:
            seq.timing.first_token = now
            self.metrics.time_to_first_token.observe(now - seq.timing.submitted)
        seq.generated.append(int(r.token))
        if r.finish_reason == "stop":  # an end-of-turn token: not part of the text
            self.finish(seq, "end_turn", None, r.prompt_cache, list(r.all_tokens))
            return
        text = seq.output.add(int(r.token))
        if text:
            seq.handle.deliver(TextDelta(text))
        if seq.output.stopped is not None:
            if r.finish_reason:
                self.finish(seq, "stop_sequence", seq.output.stopped, r.prompt_cache, list(r.all_tokens))
            else:
                self.finish_from_batch(seq, "stop_sequence", seq.output.stopped)
        elif r.finish_reason == "length":
            self.finish(seq, "max_tokens", None, r.prompt_cache, list(r.all_tokens))

    def finish_from_batch(self, seq: Sequence, reason: StopReason, stop: str | None) -> None:
        cache, tokens = self.runner.extract(seq)
        self.finish(seq, reason, stop, cache, tokens)

    def finish(self, seq: Sequence, reason: StopReason, stop: str | None, cache: kv.Cache, tokens: list[int]) -> None:
        assert seq.agent_id is not None
        self.scheduler.remove(seq)
        if seq.output is not None and reason != "stop_sequence":
            tail = seq.output.finish()
            if tail:
                seq.handle.deliver(TextDelta(tail))
        agent = self.store.get(seq.agent_id)
        self.residency.settle(agent, cache, tokens)
        result = self._result(seq, reason, stop)
        self._record_turn(seq, agent, result)
        self.admission.release(seq)
        # The answer is complete only once its turn is on disk: the record first (small, fsync'd on
        # the journal thread), the tensors after it on the writer thread.
        journal = self.store.journal_async(agent)
        journal.add_done_callback(lambda _: self.wake())
        seq.phase = Phase.FINISHING
        self.finishing.append((seq, result, journal, time.perf_counter()))
        if self.save_on_finish:
            self.ops.save_quietly(agent)
        self.metrics.generations.labels(reason).inc()
        self.publisher.dirty = True

    def _result(self, seq: Sequence, reason: StopReason, stop: str | None) -> GenerationResult:
        now = time.monotonic()
        t = seq.timing
        assert seq.agent_id is not None
        return GenerationResult(
            agent_id=seq.agent_id,
            text=seq.output.text if seq.output else "",
            token_ids=list(seq.generated),
            stop_reason=reason,
            stop_sequence=stop,
            usage=Usage(
                prompt_tokens=seq.prompt_tokens,
                cached_tokens=seq.reused_tokens,
                computed_tokens=seq.prompt_tokens - seq.reused_tokens,
                output_tokens=len(seq.generated),
            ),
            time_to_first_token=(t.first_token - t.submitted) if t.first_token else None,
            prefill_seconds=t.prefill_seconds,
            decode_seconds=(now - t.first_token) if t.first_token else 0.0,
            queued_seconds=(t.admitted or now) - t.submitted,
        )

    def complete_finished(self, wait: bool = False) -> None:
        """Answer the requests whose turns are durable now (or were not saved: then they say so)."""
        pending = []
        for seq, result, journal, since in self.finishing:
            if not journal.done() and not wait:
                pending.append((seq, result, journal, since))
                continue
            try:
                journal.result()
            except Exception as exc:
                result.turn_saved = False
                result.save_error = exc.message if isinstance(exc, SemanticError) else type(exc).__name__
                log.error(
                    "a finished turn could not be saved; the client is told",
                    agent=result.agent_id,
                    error=result.save_error,
                )
            result.durable_seconds = time.perf_counter() - since
            self.metrics.turn_durable_seconds.observe(result.durable_seconds)
            seq.phase = Phase.DONE
            seq.handle.deliver(Finished(result))
        self.finishing = pending

    def _record_turn(self, seq: Sequence, agent: Agent, result: GenerationResult) -> None:
        """Write the finished turn into the agent's record (the conversation, as text)."""
        req = seq.request
        if req.messages is not None:
            messages = [dict(m) for m in req.messages]
            answer: dict[str, Any] = {"role": "assistant", "content": req.continues_text + result.text}
            if messages and messages[-1].get("role") == "assistant":
                messages[-1] = answer
            else:
                messages.append(answer)
            # How the answer was made, so a UI can show it again after a restart.
            answer["meta"] = {
                "stop_reason": result.stop_reason,
                "output_tokens": result.usage.output_tokens,
                "prompt_tokens": result.usage.prompt_tokens,
                "cached_tokens": result.usage.cached_tokens,
                "ttft": round(result.time_to_first_token, 4) if result.time_to_first_token else None,
                "decode_tps": round(result.decode_tokens_per_second, 2),
            }
            if result.stop_reason == "cancelled":
                answer["cancelled"] = True
            agent.record.messages = messages
        if req.system_prompt is not None:
            agent.record.system_prompt = req.system_prompt
        agent.record.reply_start = seq.prompt_tokens
        agent.record.revision += 1
        agent.messages_loaded = True
        agent.touch()
        agent.changed()

    # Cancellation and failure ------------------------------------------------------------------------

    def cancel(self, handle: RequestHandle) -> None:
        seq = self.scheduler.find(handle)
        if seq is None:
            return
        if seq.phase in (Phase.WAITING, Phase.LOADING):
            self.scheduler.remove(seq)
            self.admission.release(seq)
            self._finish_unstarted(seq)
        elif seq.phase is Phase.PREFILL:
            # Keep what was computed: the cache holds the prompt up to the cursor.
            assert seq.agent_id is not None
            self.scheduler.remove(seq)
            self.residency.settle(self.store.get(seq.agent_id), seq.kv, list(seq.prompt[: seq.cursor]))
            seq.kv = None
            self.admission.release(seq)
            self._finish_unstarted(seq)
        elif seq.phase is Phase.DECODE:
            self.finish_from_batch(seq, "cancelled", None)

    def _finish_unstarted(self, seq: Sequence) -> None:
        now = time.monotonic()
        result = GenerationResult(
            agent_id=seq.agent_id or "",
            text="",
            token_ids=[],
            stop_reason="cancelled",
            stop_sequence=None,
            usage=Usage(len(seq.prompt), 0, 0, 0),
            time_to_first_token=None,
            prefill_seconds=seq.timing.prefill_seconds,
            decode_seconds=0.0,
            queued_seconds=now - seq.timing.submitted,
        )
        self.metrics.generations.labels("cancelled").inc()
        seq.phase = Phase.DONE
        seq.handle.deliver(Finished(result))

    def fail_or_abandon(self, seq: Sequence, exc: BaseException, stage: str) -> None:
        if isinstance(exc, SemanticError):
            self.fail(seq, exc)
        else:
            self.abandon(seq, exc, stage)

    def fail(self, seq: Sequence, exc: SemanticError) -> None:
        """A request refused while being admitted (a domain error: the client's to fix or retry)."""
        self.admission.release(seq)
        if seq.created_agent and seq.agent_id is not None and seq.agent_id in self.store:
            agent = self.store.get(seq.agent_id)
            if not agent.tokens and not agent.on_disk:
                self.residency.release(agent.id)
                self.store.unregister(agent)
        seq.phase = Phase.DONE
        seq.handle.deliver(Failed(exc))

    def abandon(self, seq: Sequence, exc: BaseException, stage: str) -> None:
        """An unexpected error while serving one sequence: fail that request alone and put its
        agent back into a state the engine can trust (what its file holds), so that no other
        request, and no later one, is affected."""
        agent_id = seq.agent_id or (seq.load.agent_id if seq.load else None)
        log.error("a request failed inside the engine; the engine goes on", stage=stage, agent=agent_id, exc_info=exc)
        self.metrics.engine_failures.labels(stage).inc()
        self.scheduler.remove(seq)
        seq.kv = None
        self.admission.release(seq)
        for target in {a for a in (seq.agent_id, seq.load.agent_id if seq.load else None) if a}:
            try:
                self._reset_agent(target, forget=seq.created_agent and target == seq.agent_id)
            except Exception:  # the reset itself failed: the agent is unusable, never the engine
                log.exception("could not reset an agent after a failure", agent=target)
        self.publisher.dirty = True
        if seq.phase is not Phase.DONE:
            seq.phase = Phase.DONE
            seq.handle.deliver(
                Failed(
                    EngineFault(
                        f"the request failed inside the engine while {_STAGE_WORDS.get(stage, stage)}; the agent "
                        "keeps its last saved state and the engine goes on serving "
                        f"(request id {seq.request.request_id or '-'})"
                    )
                )
            )

    def _reset_agent(self, agent_id: str, *, forget: bool = False) -> None:
        """Drop an agent's in-memory state after a failure; it continues from its file (or empty)."""
        self.residency.release(agent_id)
        if agent_id not in self.store:
            return
        agent = self.store.get(agent_id)
        if forget and not agent.on_disk:
            self.store.unregister(agent)
            return
        self.store.reset_to_disk(agent)

    def drop_from_batch(self, seq: Sequence) -> None:
        self.runner.drop(seq)
        self.scheduler.remove(seq)

    def fail_everything(self, exc: BaseException) -> None:
        err = exc if isinstance(exc, Exception) else EngineStopped()
        for seq in [*self.scheduler.all(), *(f[0] for f in self.finishing)]:
            seq.handle.deliver(Failed(err))
        self.scheduler.waiting.clear()
        self.scheduler.prefilling.clear()
        self.scheduler.decoding.clear()
        self.finishing = []


_STAGE_WORDS = {
    "admit": "admitting it",
    "load": "loading its agent",
    "prefill": "reading the prompt",
    "decode": "generating",
    "finish": "finishing the answer",
}
