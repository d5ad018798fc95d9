"""The scheduler: which sequences run this step, and how much of each. No MLX here.

It owns the queues (waiting, prefilling, decoding) and decides, each step:

- **Admission**, first come first served while the batch has room (SEMANTIC_MLX_MAX_BATCH_SIZE).
  Getting a sequence ready (finding its agent, reading its file, reserving KV blocks) is admission's
  job, done through the `prepare` function the engine passes in; its answer tells the scheduler what
  to do: READY (start it), LOADING or BUSY (it waits; later requests may pass it, but may not evict
  the agents of requests ahead of them), or BLOCKED on memory (it waits, and nothing behind it is
  admitted: later requests do not overtake for memory). Two requests for one agent are served in
  order, since the second is BUSY until the first finishes.
- **Prefill sharing**: at most SEMANTIC_MLX_PREFILL_STEP_SIZE prompt tokens per step, shared by
  water-filling (the shortest remaining prompt first, none gets less than an equal share), so a
  short prompt that arrives during a long one gets its first token after about one chunk.
- **Decode groups**: sequences decode in groups of similar cache length, one forward pass per
  group (a batch left-pads every sequence to its longest, so one long history would make every short
  agent attend over, and hold memory for, all of it). A sequence joins the group whose lengths stay
  within GROUP_SLACK_TOKENS or a factor of GROUP_RATIO of its own; past MAX_DECODE_GROUPS groups, the
  closest one takes it anyway.
- **Preemption**: when a decoding sequence needs a KV block for its next token and none can be
  freed, the most recently admitted other sequence is chosen to be saved to disk and resumed later.

`plan` returns a `StepPlan`; the engine executes it (the runner does the MLX work) and reports
back through `finished`, `preempted` and `ready_to_decode`. Tests drive it with fake sequences.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from semantic_core.engine.request import Phase, Sequence

GROUP_SLACK_TOKENS = 256
GROUP_RATIO = 2.0
MAX_DECODE_GROUPS = 3


class Readiness(enum.Enum):
    READY = "ready"  # agent resolved, cache hot, blocks reserved: start prefill
    LOADING = "loading"  # a file is being read for it
    BUSY = "busy"  # its agent is serving another request
    BLOCKED = "blocked"  # not enough KV memory now; something running will free it


@dataclass(frozen=True)
class Prepared:
    readiness: Readiness
    holds: tuple[str, ...] = ()  # agents it waits on: later requests must not evict them


Prepare = Callable[[Sequence, set[str]], Prepared]


@dataclass
class DecodeGroup:
    id: int
    members: list[int] = field(default_factory=list)  # sequence ids, in the batch's order


@dataclass
class StepPlan:
    """What the runner computes this step: a decode step for each group, then prompt chunks."""

    decode: list[DecodeGroup] = field(default_factory=list)
    prefill: list[tuple[Sequence, int]] = field(default_factory=list)  # (sequence, prompt tokens this step)

    @property
    def empty(self) -> bool:
        return not self.decode and not self.prefill


class Scheduler:
    def __init__(
        self,
        *,
        max_batch: int,
        prefill_step: int,
        group_slack: int = GROUP_SLACK_TOKENS,
        group_ratio: float = GROUP_RATIO,
        max_groups: int = MAX_DECODE_GROUPS,
    ) -> None:
        self.max_batch = max_batch
        self.prefill_step = prefill_step
        self.group_slack = group_slack
        self.group_ratio = group_ratio
        self.max_groups = max_groups
        self.waiting: deque[Sequence] = deque()
        self.prefilling: list[Sequence] = []
        self.decoding: dict[int, Sequence] = {}
        self.groups: list[DecodeGroup] = []
        self._group_ids = 0

    # Queues ---------------------------------------------------------------------------------------

    def add(self, seq: Sequence) -> None:
        seq.phase = Phase.WAITING
        self.waiting.append(seq)

    def resume_first(self, seq: Sequence) -> None:
        """A preempted sequence goes back to the head of the queue."""
        seq.phase = Phase.WAITING
        seq.group = None
        self.waiting.appendleft(seq)

    def remove(self, seq: Sequence) -> None:
        """Forget a sequence wherever it is (finished, cancelled, failed)."""
        if seq in self.waiting:
            self.waiting.remove(seq)
        if seq in self.prefilling:
            self.prefilling.remove(seq)
        self.decoding.pop(seq.id, None)
        for group in self.groups:
            if seq.id in group.members:
                group.members.remove(seq.id)
        self.groups = [g for g in self.groups if g.members]
        seq.group = None

    def all(self) -> list[Sequence]:
        return [*self.waiting, *self.prefilling, *self.decoding.values()]

    def running(self) -> list[Sequence]:
        return [*self.prefilling, *self.decoding.values()]

    def running_agents(self) -> set[str]:
        return {s.agent_id for s in self.running() if s.agent_id is not None}

    def find(self, handle: object) -> Sequence | None:
        return next((s for s in self.all() if s.handle is handle), None)

    # Admission ----------------------------------------------------------------------------------

    def admit(self, prepare: Prepare) -> tuple[list[Sequence], list[tuple[Sequence, BaseException]]]:
        """Admit waiting sequences in order while the batch has room. Returns (admitted, failed);
        admitted ones are in PREFILL (the engine starts them), failed ones are out of the queue."""
        admitted: list[Sequence] = []
        failed: list[tuple[Sequence, BaseException]] = []
        ahead: set[str] = set()
        for seq in list(self.waiting):
            if len(self.prefilling) + len(self.decoding) >= self.max_batch:
                break
            protect = self.running_agents() | ahead
            try:
                prepared = prepare(seq, protect)
            except Exception as exc:  # the engine decides what the failure means
                self.waiting.remove(seq)
                failed.append((seq, exc))
                continue
            if prepared.readiness is Readiness.READY:
                self.waiting.remove(seq)
                seq.phase = Phase.PREFILL
                self.prefilling.append(seq)
                admitted.append(seq)
                continue
            if prepared.readiness is Readiness.BLOCKED:
                break  # first come first served: later requests do not overtake for memory
            if prepared.readiness is Readiness.LOADING:
                seq.phase = Phase.LOADING
            ahead.update(prepared.holds)
        return admitted, failed

    # Decode room ---------------------------------------------------------------------------------

    def by_admission(self) -> list[Sequence]:
        """Decoding sequences, the longest running first (they get room first)."""
        return sorted(self.decoding.values(), key=lambda s: s.timing.admitted or 0.0)

    def preemption_victim(self, exclude: Sequence) -> Sequence | None:
        """The most recently admitted decoding sequence other than `exclude`."""
        others = [s for s in self.decoding.values() if s is not exclude]
        return max(others, key=lambda s: s.timing.admitted or 0.0) if others else None

    # Prefill -----------------------------------------------------------------------------------------

    def plan_prefill(self) -> list[tuple[Sequence, int]]:
        """This step's prompt tokens per prefilling sequence (water-filling, shortest first)."""
        budget = self.prefill_step
        order = sorted(self.prefilling, key=lambda s: s.remaining_prompt)
        plan: list[tuple[Sequence, int]] = []
        for i, seq in enumerate(order):
            if budget <= 0:
                break
            share = max(budget // (len(order) - i), 1)
            n = min(seq.remaining_prompt, share)
            plan.append((seq, n))
            budget -= n
        return plan

    def plan(self) -> StepPlan:
        """This step's work: every decode group (their sequences have room for a token: the engine
        made it, preempting where it had to), then the prefill chunks."""
        return StepPlan(decode=[g for g in self.groups if g.members], prefill=self.plan_prefill())

    def prompt_done(self) -> list[Sequence]:
        return [s for s in self.prefilling if s.remaining_prompt == 0]

    # Decode groups -----------------------------------------------------------------------------------

    def place(self, seqs: Iterable[Sequence]) -> list[tuple[DecodeGroup, list[Sequence]]]:
        """Choose decode groups for sequences whose prompt is done (not yet members: `join` them
        once their batch exists). Groups may be new (no members yet)."""
        placed: dict[int, list[Sequence]] = {}
        new_groups: list[DecodeGroup] = []
        for seq in sorted(seqs, key=lambda s: s.cache_tokens):
            group = self._group_for(seq.cache_tokens, placed, new_groups)
            placed.setdefault(group.id, []).append(seq)
        by_id = {g.id: g for g in [*self.groups, *new_groups]}
        return [(by_id[gid], members) for gid, members in placed.items()]

    def join(self, group: DecodeGroup, seqs: list[Sequence]) -> None:
        if group not in self.groups:
            self.groups.append(group)
        for seq in seqs:
            if seq in self.prefilling:
                self.prefilling.remove(seq)
            seq.phase = Phase.DECODE
            seq.group = group.id
            group.members.append(seq.id)
            self.decoding[seq.id] = seq

    def drop_group(self, group: DecodeGroup) -> list[Sequence]:
        """Take a whole group out (its batch failed): returns its sequences."""
        members = [self.decoding.pop(i) for i in group.members if i in self.decoding]
        self.groups = [g for g in self.groups if g is not group]
        for seq in members:
            seq.group = None
        return members

    def group_lengths(self, group: DecodeGroup) -> list[int]:
        return [self.decoding[i].cache_tokens for i in group.members if i in self.decoding]

    def _group_for(self, tokens: int, placed: dict[int, list[Sequence]], new_groups: list[DecodeGroup]) -> DecodeGroup:
        candidates = [*self.groups, *new_groups]

        def spread(group: DecodeGroup) -> tuple[int, int]:
            lengths = self.group_lengths(group) + [s.cache_tokens for s in placed.get(group.id, [])]
            return (min(lengths), max(lengths)) if lengths else (tokens, tokens)

        best: DecodeGroup | None = None
        best_gap = 0
        for group in candidates:
            low, high = spread(group)
            low, high = min(low, tokens), max(high, tokens)
            gap = high - low
            if (gap <= self.group_slack or high <= self.group_ratio * low) and (best is None or gap < best_gap):
                best, best_gap = group, gap
        if best is not None:
            return best
        if len(candidates) < self.max_groups:
            group = DecodeGroup(self._next_group_id())
            new_groups.append(group)
            return group
        return min(candidates, key=lambda g: abs(sum(spread(g)) / 2 - tokens))

    def _next_group_id(self) -> int:
        self._group_ids += 1
        return self._group_ids
