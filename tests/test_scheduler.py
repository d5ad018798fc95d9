"""The scheduler alone: fake sequences, a fake `prepare`, no model and no MLX.

It decides admission order, same-agent ordering (through BUSY), memory blocking, the prefill budget
split, decode grouping and the preemption victim; these tests drive each decision directly.
"""

from __future__ import annotations

import subprocess
import sys

from semantic_core.engine.request import Phase, Sequence, Timing
from semantic_core.engine.scheduler import Prepared, Readiness, Scheduler
from semantic_core.engine.types import GenerationRequest


def seq(tokens: int = 10, agent: str | None = None, admitted: float | None = None) -> Sequence:
    s = Sequence(
        handle=object(),
        request=GenerationRequest(tokens=list(range(1, tokens + 1)), agent_id=agent),
        timing=Timing(submitted=0.0, admitted=admitted),
    )
    s.agent_id = agent
    return s


def sched(**kw) -> Scheduler:
    kw.setdefault("max_batch", 8)
    kw.setdefault("prefill_step", 512)
    return Scheduler(**kw)


def test_the_scheduler_imports_no_mlx():
    code = (
        "import sys, semantic_core.engine.scheduler; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('mlx', 'mlx_lm')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]"


def test_admission_is_first_come_first_served_up_to_the_batch_size():
    s = sched(max_batch=2)
    a, b, c = seq(agent="a"), seq(agent="b"), seq(agent="c")
    for x in (a, b, c):
        s.add(x)
    admitted, failed = s.admit(lambda x, protect: Prepared(Readiness.READY))
    assert admitted == [a, b] and failed == []
    assert list(s.waiting) == [c] and all(x.phase is Phase.PREFILL for x in (a, b))


def test_a_blocked_request_stops_later_ones_but_a_busy_one_does_not():
    s = sched()
    first, second, third = seq(agent="x"), seq(agent="y"), seq(agent="z")
    for x in (first, second, third):
        s.add(x)
    answers = {id(first): Readiness.BUSY, id(second): Readiness.READY, id(third): Readiness.READY}
    admitted, _ = s.admit(lambda x, protect: Prepared(answers[id(x)]))
    assert admitted == [second, third]  # busy: the agent is serving another request; others pass it
    s2 = sched()
    blocked, later = seq(agent="p"), seq(agent="q")
    s2.add(blocked)
    s2.add(later)
    admitted, _ = s2.admit(lambda x, protect: Prepared(Readiness.BLOCKED if x is blocked else Readiness.READY))
    assert admitted == []  # memory: nothing overtakes the first in line


def test_later_requests_may_not_evict_the_agents_of_requests_ahead():
    s = sched()
    loading, later = seq(agent="loading-agent"), seq(agent="later")
    s.add(loading)
    s.add(later)
    seen: dict[int, set[str]] = {}

    def prepare(x, protect):
        seen[id(x)] = set(protect)
        if x is loading:
            return Prepared(Readiness.LOADING, holds=("loading-agent",))
        return Prepared(Readiness.READY)

    s.admit(prepare)
    assert "loading-agent" in seen[id(later)]
    assert loading.phase is Phase.LOADING and list(s.waiting) == [loading]


def test_a_failing_prepare_fails_only_that_request():
    s = sched()
    bad, good = seq(agent="bad"), seq(agent="good")
    s.add(bad)
    s.add(good)

    def prepare(x, protect):
        if x is bad:
            raise ValueError("no such thing")
        return Prepared(Readiness.READY)

    admitted, failed = s.admit(prepare)
    assert admitted == [good] and [f[0] for f in failed] == [bad] and bad not in s.waiting


def test_prefill_budget_is_shared_by_water_filling():
    s = sched(prefill_step=512)
    short, medium, long = seq(50), seq(300), seq(5000)
    for x in (long, medium, short):
        s.prefilling.append(x)
    plan = dict((x.id, n) for x, n in s.plan_prefill())
    # The shortest finishes (49 of its 50: the last token is fed by the first decode step), the rest
    # share what is left, none getting less than an equal share.
    assert plan[short.id] == 49
    assert plan[medium.id] == (512 - 49) // 2
    assert plan[long.id] == 512 - 49 - (512 - 49) // 2
    assert sum(plan.values()) == 512


def test_a_short_prompt_arriving_during_a_long_one_finishes_in_one_chunk():
    s = sched(prefill_step=256)
    long = seq(4000)
    long.cursor = 1000
    s.prefilling.append(long)
    short = seq(40)
    s.prefilling.append(short)
    plan = dict((x.id, n) for x, n in s.plan_prefill())
    assert plan[short.id] == 39 and plan[long.id] == 256 - 39


def _decoding(s: Scheduler, lengths: list[int]) -> list[Sequence]:
    seqs = []
    for n in lengths:
        x = seq(n)
        x.cursor = n - 1
        x.cache_tokens = n
        s.prefilling.append(x)
        seqs.append(x)
    for group, members in s.place(seqs):
        s.join(group, members)
    return seqs


def test_similar_lengths_share_a_group_and_a_long_history_gets_its_own():
    s = sched()
    seqs = _decoding(s, [100, 120, 150, 2000])
    groups = sorted(sorted(s.group_lengths(g)) for g in s.groups)
    assert groups == [[100, 120, 150], [2000]]
    assert all(x.phase is Phase.DECODE for x in seqs)


def test_at_most_three_groups_then_the_closest_takes_it():
    s = sched()
    _decoding(s, [100, 1000, 10000])
    assert len(s.groups) == 3
    extra = _decoding(s, [1300])
    assert len(s.groups) == 3
    group_of_extra = next(g for g in s.groups if extra[0].id in g.members)
    assert sorted(s.group_lengths(group_of_extra)) == [1000, 1300]


def test_preemption_picks_the_most_recently_admitted_other_sequence():
    s = sched()
    old, middle, young = (seq(10, admitted=t) for t in (1.0, 2.0, 3.0))
    for x in (old, middle, young):
        x.cursor, x.cache_tokens = 9, 10
        s.prefilling.append(x)
    for group, members in s.place([old, middle, young]):
        s.join(group, members)
    assert s.preemption_victim(exclude=old) is young
    assert s.preemption_victim(exclude=young) is middle
    assert [x.timing.admitted for x in s.by_admission()] == [1.0, 2.0, 3.0]
    s.remove(young)
    s.remove(middle)
    assert s.preemption_victim(exclude=old) is None


def test_a_preempted_sequence_resumes_first_in_line():
    s = sched()
    waiting = seq(agent="w")
    s.add(waiting)
    preempted = seq(agent="p")
    s.resume_first(preempted)
    assert list(s.waiting) == [preempted, waiting] and preempted.phase is Phase.WAITING


def test_removing_a_sequence_empties_its_group():
    s = sched()
    (only,) = _decoding(s, [64])
    s.remove(only)
    assert s.groups == [] and s.decoding == {}
    assert s.plan().empty
