"""Assembling an engine's parts once its model is loaded (the engine thread's start-up): the pool, the
store, residency, admission, the runner, agent operations, the publisher and the lifecycle, wired to
each other and to the engine. In distributed mode the ranks first agree on what must match (see
distributed.py)."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from semantic_core.agents.disk import Expectations
from semantic_core.agents.store import AgentStore
from semantic_core.engine.admission import Admission
from semantic_core.engine.block_pool import BlockPool
from semantic_core.engine.constraints import Grammars
from semantic_core.engine.lifecycle import Lifecycle
from semantic_core.engine.operations import AgentOperations
from semantic_core.engine.output import make_detokenizer_factory
from semantic_core.engine.residency import Residency
from semantic_core.engine.runner import Runner
from semantic_core.engine.snapshot import Publisher
from semantic_core.model.tools import ToolFormat
from semantic_core.observability import get_logger

if TYPE_CHECKING:
    from semantic_core.engine.engine import Engine

log = get_logger("semantic.engine")


def assemble(engine: Engine) -> None:
    """Load the model (unless the engine was handed one) and build every part around it."""
    from semantic_core.model import loader

    dist = engine.dist
    if engine._loaded is None:
        engine._loaded = loader.load(engine.settings, pipeline_group=dist.group if dist is not None else None)
    engine.model = engine._loaded.model
    engine.tokenizer = engine._loaded.tokenizer
    info = engine.info = engine._loaded.info
    bytes_per_token = info.bytes_per_token
    s = engine.settings
    if dist is not None:
        import random

        import mlx.core as mx

        # Same pool on every rank (blocks decide evictions), same draws (sampling, agent ids).
        bytes_per_token = dist.max_int(info.bytes_per_token)
        seed = dist.shared_seed()
        mx.random.seed(seed)
        id_rng = random.Random(seed)
        # Each rank keeps its own layers' caches, in a folder of its own.
        s = engine.settings = s.model_copy(
            update={"agent_cache_dir": s.agent_cache_dir / f"pp{dist.rank}of{dist.size}"}
        )
    engine.tool_format = ToolFormat.of(engine.tokenizer)
    engine.grammars = Grammars(engine.tokenizer, info.vocab_size, sorted(engine.tokenizer.eos_token_ids))
    engine.pool = BlockPool.from_budget(s.mlx_cache_budget_mb, s.mlx_block_tokens, bytes_per_token)
    engine.store = AgentStore(
        s.agents_dir,
        s.quarantine_dir,
        fingerprint=info.fingerprint,
        model_id=info.model_id,
        block_tokens=s.mlx_block_tokens,
        metrics=engine.metrics,
        max_agents=s.agent_max_agents,
        expect=Expectations(info.cache_spec, info.vocab_size),
        ownership=engine.ownership,
        inline_io=dist is not None,
    )
    if dist is not None:
        engine.store.id_rng = id_rng
    engine.store.scan()
    engine.residency = Residency(engine.pool, engine.store, s.agent_max_agents_in_memory, engine.metrics)
    engine.admission = Admission(
        engine.store,
        engine.residency,
        engine._new_cache,
        budget_mb=s.mlx_cache_budget_mb,
        anything_running=lambda: bool(engine.scheduler.running()),
        wake=engine._wake.set,
    )
    # One core stays free for MLX's own thread, the event loop and the UI: a BLAS that spreads
    # over every core of a busy machine waits on its slowest thread (measured here: a 2,045-token
    # prefill took 47 s with 2 threads and 20 s with 1 while another process held one core).
    prefill_threads = s.mlx_blas_prefill_threads or max(1, (os.cpu_count() or 1) - 1)
    engine.runner = Runner(
        engine.model,
        set(engine.tokenizer.eos_token_ids),
        decode_threads=s.mlx_blas_decode_threads,
        prefill_threads=prefill_threads,
    )
    engine.agents = AgentOperations(
        call=engine.call,
        store=engine.store,
        residency=engine.residency,
        admission=engine.admission,
        new_cache=engine._new_cache,
        bytes_per_token=info.bytes_per_token,
        running_tokens=engine._running_tokens,
    )
    engine.publisher = Publisher(
        engine.pool,
        engine.store,
        engine.residency,
        engine.admission,
        engine.metrics,
        info.bytes_per_token,
        engine._running_tokens,
    )
    engine.life = Lifecycle(
        scheduler=engine.scheduler,
        admission=engine.admission,
        residency=engine.residency,
        store=engine.store,
        runner=engine.runner,
        ops=engine.agents,
        publisher=engine.publisher,
        metrics=engine.metrics,
        detok_factory=make_detokenizer_factory(engine.tokenizer),
        context_length=info.context_length,
        save_on_finish=s.agent_save_on_finish,
        wake=engine._wake.set,
    )
    log.info(
        "engine ready",
        model=info.model_id,
        device=info.device,
        weights=info.weights,
        blas=info.blas,
        kernels=info.kernels,
        cache=info.cache_spec.describe(),
        kv_format=info.kv_description,
        pool_blocks=engine.pool.capacity,
        block_tokens=engine.pool.block_tokens,
        kv_bytes_per_token=info.bytes_per_token,
        agents=len(engine.store),
    )
