"""Adversarial regression tests against a real server: no request and no file stops the engine,
nothing secret reaches a log, strings that are not text are refused before anything is created, an
answered turn survives kill -9, what agents store is bounded, and a browser page on another site
cannot read or change anything.

Each test uses its own server (tiny model) and cache folder.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from semantic_core.agents import disk
from semantic_core.agents.record import AgentRecord
from semantic_core.observability import configure_logging, flush_logging
from tests.test_serve_process import free_port

ROOT = Path(__file__).resolve().parent.parent
MODEL = "tiny"
KEY = "sk-redteam-secret-4242"
JSON = {"content-type": "application/json"}


def user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def post(server, path: str, body: object, **headers: str) -> httpx.Response:
    return httpx.post(f"{server.url}{path}", json=body, headers=headers, timeout=60)


def chat(server, text: str = "hi", agent: str | None = None, **fields: object) -> httpx.Response:
    body = {"model": MODEL, "max_tokens": 4, "temperature": 0, "messages": user(text), **fields}
    return post(server, "/v1/messages", body, **({"x-agent-id": agent} if agent else {}))


def still_serving(server) -> None:
    r = chat(server, "are you still there?")
    assert r.status_code == 200, r.text
    assert httpx.get(f"{server.url}/health/live").status_code == 200
    assert httpx.get(f"{server.url}/health/ready").status_code == 200


# One request cannot stop the engine ------------------------------------------------------------------


def test_top_k_of_the_vocabulary_size_is_served_and_the_engine_goes_on(server_factory):
    server = server_factory()
    vocab = server.engine.info.vocab_size
    for top_k in (vocab - 1, vocab, vocab + 1, 2**31):
        r = chat(server, "sample", temperature=1.0, top_k=top_k)
        assert r.status_code == 200, (top_k, r.text)
    still_serving(server)


@pytest.mark.parametrize(
    ("field", "values"),
    [
        ("max_tokens", [0, -1, 2**63, 1e308, "5", True, None, 5.0, [], {}]),
        ("temperature", [-1, 2.0001, "0.5", True, [], 1e308]),
        ("top_p", [0, -0.1, 1.0000001, "1", False]),
        ("top_k", [-1, 1.5, "3", True, 2**64]),
    ],
)
def test_every_numeric_field_at_its_extremes_is_a_400_or_served(server_factory, field, values):
    server = server_factory()
    for value in values:
        body = {"model": MODEL, "max_tokens": 4, "messages": user("x"), field: value}
        r = post(server, "/v1/messages", body)
        assert r.status_code in (200, 400), (field, value, r.status_code, r.text)
        if r.status_code == 400:
            assert r.json()["error"]["type"] == "invalid_request_error"
            assert field in r.json()["error"]["message"], r.text
    # NaN and infinities as JSON literals (Python's json reads them).
    for literal in ("NaN", "Infinity", "-Infinity"):
        raw = '{"model": "tiny", "max_tokens": 4, "messages": [{"role": "user", "content": "x"}], "%s": %s}'
        r = httpx.post(f"{server.url}/v1/messages", content=raw % (field, literal), headers=JSON)
        assert r.status_code == 400, (field, literal, r.text)
    still_serving(server)


def test_max_tokens_that_is_not_an_integer_is_refused_like_anthropic_does(server_factory):
    server = server_factory()
    for value in ("5", True, 5.0):
        r = chat(server, max_tokens=value)
        assert r.status_code == 400 and "max_tokens" in r.json()["error"]["message"], (value, r.text)


def test_a_temperature_that_would_overflow_samples_greedily(server_factory):
    server = server_factory()
    greedy = chat(server, "count to ten", max_tokens=12, temperature=0).json()
    tiny = chat(server, "count to ten", max_tokens=12, temperature=1e-39).json()
    assert tiny["content"][0]["text"] == greedy["content"][0]["text"]


def test_a_failure_inside_one_request_fails_it_alone(server_factory, monkeypatch):
    """A fault deep in one sequence's forward pass (here, injected) fails that request with a 500
    naming its request id; the agent keeps its last saved state; the next requests are served."""
    server = server_factory()
    assert chat(server, "first turn", agent="victim").status_code == 200
    model_cls = type(server.engine.model)
    real_call = model_cls.__call__
    armed = {"left": 1}

    def sometimes_broken(self, inputs, *args, **kwargs):
        if armed["left"] and inputs.shape[1] > 1:  # a prompt chunk
            armed["left"] -= 1
            raise RuntimeError("injected fault")
        return real_call(self, inputs, *args, **kwargs)

    monkeypatch.setattr(model_cls, "__call__", sometimes_broken)
    r = chat(server, "a second turn with a longer prompt", agent="victim")
    assert r.status_code == 500 and r.json()["error"]["type"] == "api_error"
    assert "request id" in r.json()["error"]["message"]
    monkeypatch.setattr(model_cls, "__call__", real_call)
    again = chat(server, "a second turn with a longer prompt", agent="victim")
    assert again.status_code == 200, again.text
    still_serving(server)
    text = httpx.get(f"{server.url}/metrics").text
    assert 'semantic_engine_failures_total{stage="prefill"} 1.0' in text


def test_a_dead_engine_loop_fails_the_probes(server_factory, monkeypatch):
    from semantic_core.engine.engine import Engine

    server = server_factory()
    original = Engine._schedule

    def broken(self):
        if self.scheduler.waiting:
            raise SystemError("a bug outside every per-request guard")
        return original(self)

    monkeypatch.setattr(Engine, "_schedule", broken)
    r = chat(server, "this request meets the bug")
    assert r.status_code >= 500
    assert server.engine.dead.wait(10)
    assert httpx.get(f"{server.url}/health/live").status_code == 503
    assert httpx.get(f"{server.url}/health/ready").status_code == 503


@pytest.mark.slow
def test_semantic_serve_exits_non_zero_when_its_engine_loop_dies(tiny_model_dir, tmp_path):
    port = free_port()
    env = {
        **os.environ,
        "SEMANTIC_MLX_MODEL_ID": str(tiny_model_dir),
        "SEMANTIC_AGENT_CACHE_DIR": str(tmp_path),
        "SEMANTIC_SERVER_PORT": str(port),
        "SEMANTIC_SERVER_LOG_LEVEL": "PRODUCTION",
    }
    log_file = (tmp_path / "serve.log").open("w")  # a file, not a pipe nobody reads while it runs
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.helpers.dying_serve"],
        cwd=ROOT,
        env=env,
        stdout=log_file,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{url}/health/ready", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        httpx.post(
            f"{url}/v1/messages",
            json={"model": "claude-local-test", "max_tokens": 2, "messages": user("boom")},
            timeout=30,
        )
        assert proc.wait(30) == 70
    finally:
        if proc.poll() is None:
            proc.kill()
    log_file.close()
    assert "the engine loop crashed" in (tmp_path / "serve.log").read_text()


# Files that do not fit the model --------------------------------------------------------------------


def _forge(
    agents_dir: Path,
    engine,
    agent_id: str,
    *,
    layers: int | None = None,
    kv_heads: int | None = None,
    head_dim: int | None = None,
    dtype=np.float32,
    tokens: list[int] | None = None,
) -> None:
    """An agent file with a valid checksum and the loaded model's fingerprint that does not fit it."""
    info = engine.info
    tokens = tokens or [5] * 10
    from semantic_core.model import kv

    shape = (1, kv_heads or info.kv_heads, len(tokens), head_dim or info.head_dim)
    arrays = [
        kv.LayerState(
            kv.PLAIN,
            {"keys": np.zeros(shape, dtype=dtype), "values": np.zeros(shape, dtype=dtype)},
            {"offset": len(tokens)},
        )
        for _ in range(layers or info.num_layers)
    ]
    record = AgentRecord(id=agent_id, messages=[{"role": "user", "content": "forged"}])
    disk.write_agent_file(
        disk.agent_path(agents_dir, agent_id),
        record,
        tokens,
        arrays,
        fingerprint=info.fingerprint,
        model_id=info.model_id,
    )


FORGERIES = {
    "too-many-layers": {"layers": 9},
    "too-few-layers": {"layers": 1},
    "wrong-head-dim": {"head_dim": 8},
    "wrong-kv-heads": {"kv_heads": 3},
    "wrong-dtype": {"dtype": np.float16},
    "tokens-out-of-vocab": {"tokens": [10**6] * 10},
}


def test_agent_files_that_do_not_fit_the_model_are_quarantined_at_start_up(server_factory, tmp_path):
    seed = server_factory()  # only to learn the model's fingerprint and geometry
    agents_dir = tmp_path / "forged" / "agents"
    agents_dir.mkdir(parents=True)
    for agent_id, how in FORGERIES.items():
        _forge(agents_dir, seed.engine, agent_id, **how)
    server = server_factory(agent_cache_dir=tmp_path / "forged")
    listed = {a["id"]: a for a in httpx.get(f"{server.url}/v1/agents").json()["data"]}
    for agent_id in FORGERIES:
        assert listed[agent_id]["tier"] == "damaged", (agent_id, listed[agent_id])
        r = chat(server, "hello", agent=agent_id)
        assert r.status_code == 500 and "damaged" in r.json()["error"]["message"], r.text
    assert len(list((tmp_path / "forged" / "quarantine").glob("*.reason.txt"))) == len(FORGERIES)
    still_serving(server)


def test_an_agent_file_replaced_while_cold_is_quarantined_when_loaded(server_factory, tmp_path):
    server = server_factory()
    assert chat(server, "remember me", agent="swapped").status_code == 200
    assert post(server, "/v1/agents/swapped/evict", {}).json()["tier"] == "cold"
    _forge(server.settings.agents_dir, server.engine, "swapped", layers=2)
    r = chat(server, "remember me", agent="swapped")
    assert r.status_code == 500 and "quarantined" in r.json()["error"]["message"]
    assert httpx.get(f"{server.url}/v1/agents/swapped").json()["tier"] == "damaged"
    still_serving(server)


def test_a_fifo_or_a_symlink_in_the_agents_folder_does_not_block_start_up(server_factory, tmp_path):
    agents_dir = tmp_path / "odd" / "agents"
    agents_dir.mkdir(parents=True)
    os.mkfifo(agents_dir / "pipe.safetensors")
    (tmp_path / "outside.safetensors").write_bytes(b"not yours")
    (agents_dir / "link.safetensors").symlink_to(tmp_path / "outside.safetensors")
    server = server_factory(agent_cache_dir=tmp_path / "odd")  # would hang on the FIFO before
    listed = {a["id"]: a["tier"] for a in httpx.get(f"{server.url}/v1/agents").json()["data"]}
    assert listed == {"pipe": "damaged", "link": "damaged"}
    assert (tmp_path / "outside.safetensors").read_bytes() == b"not yours"
    still_serving(server)


# Logs ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["INFO", "PRODUCTION"])
def test_a_failing_request_logs_a_traceback_without_its_key_or_prompt(server_factory, monkeypatch, mode):
    stream = io.StringIO()
    server = server_factory(anthropic_api_key=KEY, server_log_level=mode)
    configure_logging(mode, stream=stream)
    secret_prompt = "the launch code is swordfish-771"

    async def broken(*args, **kwargs):
        raise RuntimeError("something unexpected")

    monkeypatch.setattr(server.app.state.turns, "render", broken)
    r = httpx.post(
        f"{server.url}/v1/messages",
        headers={"x-api-key": KEY},
        json={"model": MODEL, "max_tokens": 4, "messages": user(secret_prompt)},
        timeout=30,
    )
    assert r.status_code == 500 and r.json()["error"]["type"] == "api_error"
    request_id = r.headers["request-id"]
    assert request_id in r.json()["error"]["message"]
    flush_logging()
    text = stream.getvalue()
    assert "unhandled error" in text and "RuntimeError" in text and "Traceback" in text
    assert request_id in text  # the traceback is tied to its request
    assert text.count("unhandled error") == 1  # logged once, not again by the server
    assert KEY not in text and "swordfish" not in text
    if mode == "PRODUCTION":
        lines = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
        failure = next(line for line in lines if line.get("event") == "unhandled error")
        assert "Traceback" in failure["exception"]


def test_access_log_lines_never_carry_headers_or_bodies(server_factory):
    stream = io.StringIO()
    server = server_factory(anthropic_api_key=KEY, server_log_level="DEBUG")
    configure_logging("DEBUG", stream=stream)
    for body in (
        {"model": MODEL, "max_tokens": 2, "messages": user("payload-marker-xyz")},
        {"model": MODEL, "max_tokens": "bad", "messages": user("payload-marker-xyz")},
    ):
        httpx.post(f"{server.url}/v1/messages", headers={"x-api-key": KEY, "x-agent-id": "logged"}, json=body)
    httpx.post(f"{server.url}/v1/messages", headers={"x-api-key": "sk-wrong-key-0000"}, json={})
    flush_logging()
    text = stream.getvalue()
    assert "/v1/messages" in text
    for secret in (KEY, "sk-wrong-key-0000", "payload-marker-xyz"):
        assert secret not in text


# Strings that are not text ----------------------------------------------------------------------------

SURROGATE = "\\ud800"  # as a JSON escape: a lone surrogate no UTF-8 text can hold


def _raw(server, method: str, path: str, raw: str, **headers: str) -> httpx.Response:
    return httpx.request(method, f"{server.url}{path}", content=raw.encode(), headers={**JSON, **headers}, timeout=30)


@pytest.mark.parametrize(
    ("where", "template"),
    [
        ("messages.0.content", '{"model":"tiny","max_tokens":2,"messages":[{"role":"user","content":"a%sb"}]}'),
        (
            "messages.0.content.0.text",
            '{"model":"tiny","max_tokens":2,"messages":[{"role":"user","content":[{"type":"text","text":"%s"}]}]}',
        ),
        ("system", '{"model":"tiny","max_tokens":2,"system":"%s","messages":[{"role":"user","content":"x"}]}'),
        (
            "stop_sequences.0",
            '{"model":"tiny","max_tokens":2,"stop_sequences":["%s"],"messages":[{"role":"user","content":"x"}]}',
        ),
        ("model", '{"model":"%s","max_tokens":2,"messages":[{"role":"user","content":"x"}]}'),
        (
            "metadata.user_id",
            '{"model":"tiny","max_tokens":2,"metadata":{"user_id":"%s"},"messages":[{"role":"user","content":"x"}]}',
        ),
        (
            "some_future_field",
            '{"model":"tiny","max_tokens":2,"some_future_field":"%s","messages":[{"role":"user","content":"x"}]}',
        ),
    ],
)
def test_lone_surrogates_in_messages_are_a_400_naming_the_field(server_factory, where, template):
    server = server_factory()
    for path in ("/v1/messages", "/v1/messages/count_tokens"):
        r = _raw(server, "POST", path, template % SURROGATE, **{"x-agent-id": "never-made"})
        assert r.status_code == 400, r.text
        assert r.json()["error"]["message"].startswith(where), r.json()
    assert httpx.get(f"{server.url}/v1/agents").json()["data"] == []
    still_serving(server)


def test_lone_surrogates_in_agent_fields_create_nothing_and_break_no_listing(server_factory):
    server = server_factory()
    for raw in ('{"id": "s1", "system_prompt": "%s"}', '{"id": "s2", "display_name": "x%s"}'):
        r = _raw(server, "POST", "/v1/agents", raw % SURROGATE)
        assert r.status_code == 400, r.text
    assert httpx.get(f"{server.url}/v1/agents").json()["data"] == []
    assert post(server, "/v1/agents", {"id": "real"}).status_code == 201
    r = _raw(server, "PATCH", "/v1/agents/real", f'{{"display_name": "{SURROGATE}"}}')
    assert r.status_code == 400
    r = _raw(server, "POST", "/v1/agents/real/fork", f'{{"display_name": "{SURROGATE}"}}')
    assert r.status_code == 400
    listing = httpx.get(f"{server.url}/v1/agents")
    assert listing.status_code == 200 and [a["id"] for a in listing.json()["data"]] == ["real"]
    assert post(server, "/v1/agents/real/save", {}).status_code == 200


def test_control_characters_in_names_and_ids_are_refused_but_not_in_text(server_factory):
    server = server_factory()
    assert post(server, "/v1/agents", {"id": "ok", "display_name": "bell\x07"}).status_code == 400
    assert post(server, "/v1/agents", {"id": "trailing\n"}).status_code == 400
    assert chat(server, "tabs\tand\nnewlines and a nul \x00 byte").status_code == 200
    assert httpx.get(f"{server.url}/v1/agents/ok").status_code == 404


def test_empty_content_is_refused_like_anthropic_does(server_factory):
    server = server_factory()
    assert chat(server, "").status_code == 400
    empty_block = [{"role": "user", "content": [{"type": "text", "text": ""}]}]
    r = post(server, "/v1/messages", {"model": MODEL, "max_tokens": 2, "messages": empty_block})
    assert r.status_code == 400 and "non-empty" in r.json()["error"]["message"]
    prefill = [*user("Say yes"), {"role": "assistant", "content": ""}]
    assert post(server, "/v1/messages", {"model": MODEL, "max_tokens": 2, "messages": prefill}).status_code == 200


# Agents: deletes, creates and ids --------------------------------------------------------------------


def test_ids_that_differ_only_in_case_cannot_both_exist(server_factory):
    server = server_factory()
    assert post(server, "/v1/agents", {"id": "Alpha"}).status_code == 201
    r = post(server, "/v1/agents", {"id": "alpha"})
    assert r.status_code == 400 and "case" in r.json()["error"]["message"]
    assert chat(server, "hi", agent="ALPHA").status_code == 400


def test_a_delete_that_cannot_remove_the_file_changes_nothing(server_factory, monkeypatch):
    server = server_factory()
    assert chat(server, "keep me", agent="sticky").status_code == 200
    real_unlink = Path.unlink

    def read_only_unlink(self, *args, **kwargs):
        if self.parent == server.settings.agents_dir and self.name.startswith("sticky"):
            raise OSError(30, "Read-only file system", str(self))
        return real_unlink(self, *args, **kwargs)

    monkeypatch.setattr(Path, "unlink", read_only_unlink)
    r = httpx.delete(f"{server.url}/v1/agents/sticky")
    assert r.status_code == 500 and "Read-only file system" in r.json()["error"]["message"]
    assert "/" not in r.json()["error"]["message"]  # no server path in what the client sees
    monkeypatch.setattr(Path, "unlink", real_unlink)
    got = httpx.get(f"{server.url}/v1/agents/sticky")
    assert got.status_code == 200 and len(got.json()["history"]) == 2
    assert httpx.delete(f"{server.url}/v1/agents/sticky").status_code == 200


def test_a_create_that_cannot_be_saved_leaves_no_agent(server_factory, monkeypatch):
    server = server_factory()

    def full_disk(path, *args, **kwargs):
        raise disk.StorageError("could not save agent: No space left on device")

    monkeypatch.setattr(disk, "write_agent_file", full_disk)
    r = post(server, "/v1/agents", {"id": "ghost"})
    assert r.status_code == 500 and "No space left" in r.json()["error"]["message"]
    monkeypatch.undo()
    assert httpx.get(f"{server.url}/v1/agents/ghost").status_code == 404
    assert post(server, "/v1/agents", {"id": "ghost"}).status_code == 201


def test_deleting_an_agent_while_a_request_loads_it_leaks_no_blocks(engine_factory):
    """A request without an agent id loads the agent whose cache matches its prompt; deleting that
    agent meanwhile must neither leak its KV blocks nor leave a half-loaded agent."""
    import threading

    from semantic_core.engine.types import GenerationRequest
    from semantic_core.errors import AgentBusy

    engine = engine_factory()
    messages = user("A long shared history. " * 30)
    tokens = engine.render(messages).tokens
    first = engine.complete(GenerationRequest(tokens=tokens, max_tokens=4, temperature=0.0, messages=messages))
    engine.evict_agent(first.agent_id)
    gate = threading.Event()
    engine.store._reader.submit(gate.wait)  # the next read waits until the gate opens
    follow = [*messages, {"role": "assistant", "content": first.text}, *user("And then?")]
    handle = engine.submit(
        GenerationRequest(tokens=engine.render(follow).tokens, max_tokens=4, temperature=0.0, messages=follow)
    )
    deadline = time.monotonic() + 10
    while not engine.call(engine.admission.loading_agents) and time.monotonic() < deadline:
        time.sleep(0.01)
    with pytest.raises(AgentBusy):
        engine.delete_agent(first.agent_id)
    gate.set()
    result = handle.wait()
    assert result.agent_id == first.agent_id and result.usage.cached_tokens > 0
    engine.delete_agent(first.agent_id)
    snap = engine.snapshot(fresh=True)
    assert snap.pool_used == 0 and snap.agents == ()


# Durability ---------------------------------------------------------------------------------------------


def _serve(model_dir: Path, cache: Path, port: int, **env: str) -> subprocess.Popen:
    from tests.test_serve_process import start

    for key, value in env.items():
        os.environ[key] = value
    try:
        return start(model_dir, cache, port)
    finally:
        for key in env:
            os.environ.pop(key, None)


@pytest.mark.slow
@pytest.mark.parametrize("stream", [False, True])
def test_kill_minus_nine_right_after_an_answer_never_loses_the_turn(tiny_model_dir, tmp_path, stream):
    """With tensor saves off after turns (SEMANTIC_AGENT_SAVE_ON_FINISH=false, so only the turn
    journal stands between an answer and its loss), kill -9 the moment the answer is complete."""
    port = free_port()
    cache = tmp_path / "cache"
    answers = []
    for turn in range(3):
        proc = _serve(tiny_model_dir, cache, port, SEMANTIC_AGENT_SAVE_ON_FINISH="false")
        url = f"http://127.0.0.1:{port}"
        body = {
            "model": "claude-local-test",
            "max_tokens": 6,
            "temperature": 0,
            "stream": stream,
            "messages": user(f"turn {turn}: remember the number {turn * 7}"),
        }
        history = httpx.get(f"{url}/v1/agents/durable").json().get("history", []) if turn else []
        body["messages"] = [*[{"role": m["role"], "content": m["content"]} for m in history], *body["messages"]]
        if stream:
            with httpx.stream(
                "POST", f"{url}/v1/messages", json=body, headers={"x-agent-id": "durable"}, timeout=60
            ) as r:
                lines = [line for line in r.iter_lines() if line]
                assert lines[-1].startswith("data:") and '"message_stop"' in lines[-1]
                os.kill(proc.pid, signal.SIGKILL)
            text = "".join(
                json.loads(line[5:])["delta"].get("text", "")
                for line in lines
                if line.startswith("data:") and '"content_block_delta"' in line
            )
        else:
            r = httpx.post(f"{url}/v1/messages", json=body, headers={"x-agent-id": "durable"}, timeout=60)
            os.kill(proc.pid, signal.SIGKILL)
            assert r.status_code == 200
            text = r.json()["content"][0]["text"]
        proc.wait()
        answers.append(text)
    proc = _serve(tiny_model_dir, cache, port)
    try:
        history = httpx.get(f"http://127.0.0.1:{port}/v1/agents/durable").json()["history"]
        assert [m["content"] for m in history if m["role"] == "assistant"] == answers
        assert len(history) == 6
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)


def test_the_turn_journal_is_newer_than_the_file_after_a_crash_and_wins(engine_factory, tmp_path):
    """Unit view of the journal: a file holding turn 1 and a journal holding turn 2 give an agent
    with turn 2's conversation and turn 1's cache (a prefix of it)."""
    from semantic_core.engine.types import GenerationRequest

    cache_dir = tmp_path / "journal-cache"
    engine = engine_factory(agent_cache_dir=cache_dir)
    m1 = user("first question")
    r1 = engine.complete(
        GenerationRequest(tokens=engine.render(m1).tokens, max_tokens=4, temperature=0.0, agent_id="j", messages=m1)
    )
    engine.stop()
    file_bytes = (cache_dir / "agents" / "j.safetensors").read_bytes()
    engine = engine_factory(agent_cache_dir=cache_dir)
    m2 = [*m1, {"role": "assistant", "content": r1.text}, *user("second question")]
    engine.complete(
        GenerationRequest(tokens=engine.render(m2).tokens, max_tokens=4, temperature=0.0, agent_id="j", messages=m2)
    )
    engine.stop()
    (cache_dir / "agents" / "j.safetensors").write_bytes(file_bytes)  # as if the tensor save never landed
    assert not (cache_dir / "agents" / "j.turn.json").exists()  # the full save removed the journal...
    # ...so write the journal of turn 2 the way a crash before the tensor save would leave it.
    record = AgentRecord(id="j", messages=[*m2, {"role": "assistant", "content": "answer two"}], revision=2)
    disk.write_journal(
        cache_dir / "agents" / "j.turn.json", record, fingerprint=engine.info.fingerprint, model_id=engine.info.model_id
    )
    engine = engine_factory(agent_cache_dir=cache_dir)
    _, history = engine.get_agent("j")
    assert [m["content"] for m in history][-1] == "answer two" and len(history) == 4
    m3 = [*history, *user("third")]
    r3 = engine.complete(
        GenerationRequest(tokens=engine.render(m3).tokens, max_tokens=4, temperature=0.0, agent_id="j", messages=m3)
    )
    assert r3.usage.cached_tokens >= len(engine.render(m1).tokens) - 1  # turn 1's cache was reused


# Bounds ----------------------------------------------------------------------------------------------------


def test_system_prompts_are_bounded(server_factory):
    server = server_factory(agent_max_system_prompt_chars=1000)
    r = post(server, "/v1/agents", {"id": "big", "system_prompt": "x" * 1001})
    assert r.status_code == 400 and "SEMANTIC_AGENT_MAX_SYSTEM_PROMPT_CHARS" in r.json()["error"]["message"]
    r = chat(server, "hi", agent="big2", system="y" * 1001)
    assert r.status_code == 400
    assert httpx.get(f"{server.url}/v1/agents").json()["data"] == []


def test_a_full_store_recycles_unnamed_agents_and_refuses_new_names(server_factory):
    server = server_factory(agent_max_agents=3)
    for name in ("named-1", "named-2"):
        assert post(server, "/v1/agents", {"id": name}).status_code == 201
    for i in range(4):  # stateless clients: each new conversation makes an unnamed agent
        r = chat(server, f"conversation number {i} " + "padding " * 40)
        assert r.status_code == 200, r.text
    ids = [a["id"] for a in httpx.get(f"{server.url}/v1/agents").json()["data"]]
    assert len(ids) == 3 and {"named-1", "named-2"} <= set(ids)
    assert post(server, "/v1/agents", {"id": "named-3"}).status_code == 201  # the unnamed one made room
    r = post(server, "/v1/agents", {"id": "named-4"})
    assert r.status_code == 400 and "SEMANTIC_AGENT_MAX_AGENTS" in r.json()["error"]["message"]
    assert chat(server, "another new conversation " * 20).status_code == 400


def test_agent_listing_is_paginated(server_factory):
    server = server_factory()
    for i in range(25):
        assert post(server, "/v1/agents", {"id": f"page-{i:02d}", "system_prompt": "s" * 500}).status_code == 201
    seen, after = [], None
    while True:
        params = {"limit": 10, **({"after_id": after} if after else {})}
        page = httpx.get(f"{server.url}/v1/agents", params=params).json()
        seen += [a["id"] for a in page["data"]]
        assert len(page["data"][0]["system_prompt"]) <= 201 and page["data"][0]["system_prompt_truncated"]
        if not page["has_more"]:
            break
        after = page["last_id"]
    assert seen == [f"page-{i:02d}" for i in range(25)]
    back = httpx.get(f"{server.url}/v1/agents", params={"limit": 5, "before_id": "page-10"}).json()
    assert [a["id"] for a in back["data"]] == [f"page-{i:02d}" for i in range(5, 10)] and back["has_more"]
    one = httpx.get(f"{server.url}/v1/agents/page-03").json()
    assert one["system_prompt"] == "s" * 500
    assert httpx.get(f"{server.url}/v1/agents", params={"limit": 0}).status_code == 400


def test_a_prompt_too_long_by_its_characters_is_refused_before_tokenizing(server_factory, monkeypatch):
    server = server_factory(server_max_body_mb=8)
    calls = {"n": 0}
    tokenizer = server.engine.tokenizer
    real_encode = tokenizer.encode

    def counting(*args, **kwargs):
        calls["n"] += 1
        return real_encode(*args, **kwargs)

    monkeypatch.setattr(tokenizer, "encode", counting)
    huge = "word " * 1_400_000  # 7 MB
    r = chat(server, huge)
    assert r.status_code == 400 and "context limit" in r.json()["error"]["message"]
    assert calls["n"] == 0
    r = post(server, "/v1/messages/count_tokens", {"model": MODEL, "messages": user(huge)})
    assert r.status_code == 400 and calls["n"] == 0


# Browsers on other sites ----------------------------------------------------------------------------------


def test_requests_for_another_host_name_are_refused(server_factory):
    server = server_factory()
    assert post(server, "/v1/agents", {"id": "private"}).status_code == 201
    for host in ("evil.example", "evil.example:80", "127.0.0.1.nip.io"):
        r = httpx.get(f"{server.url}/v1/agents/private", headers={"host": host})
        assert r.status_code == 403 and r.json()["error"]["type"] == "permission_error", host
    for host in (f"localhost:{server.port}", f"127.0.0.1:{server.port}", "[::1]"):
        assert httpx.get(f"{server.url}/v1/agents/private", headers={"host": host}).status_code == 200, host
    assert httpx.get(f"{server.url}/health/live", headers={"host": "10.0.0.7:8000"}).status_code == 200
    allowed = server_factory(server_allowed_hosts="agents.internal")
    assert httpx.get(f"{allowed.url}/v1/agents", headers={"host": "agents.internal"}).status_code == 200


def test_cross_site_requests_cannot_change_state(server_factory):
    server = server_factory()
    assert chat(server, "hi", agent="target").status_code == 200
    evict = f"{server.url}/v1/agents/target/evict"
    # A page on another site: its Origin is refused whatever it sends.
    r = httpx.post(evict, json={}, headers={"origin": "http://evil.example"})
    assert r.status_code == 403 and r.json()["error"]["type"] == "permission_error"
    # "Simple" requests (no preflight): a form post, text/plain, or no body at all.
    for headers, content in (
        ({"content-type": "application/x-www-form-urlencoded"}, b"a=1"),
        ({"content-type": "text/plain"}, b"{}"),
        ({}, b""),
    ):
        r = httpx.post(evict, headers=headers, content=content)
        assert r.status_code == 415, (headers, r.text)
    msg = {"model": MODEL, "max_tokens": 2, "messages": user("x")}
    r = httpx.post(f"{server.url}/v1/messages", content=json.dumps(msg), headers={"content-type": "text/plain"})
    assert r.status_code == 415
    assert httpx.get(f"{server.url}/v1/agents/target").json()["tier"] == "hot"  # nothing changed
    # What real clients send is accepted: JSON, or a custom header.
    assert httpx.post(evict, headers={"x-api-key": "unused"}).status_code == 200
    assert (
        httpx.post(
            f"{server.url}/v1/agents/target/load", json={}, headers={"origin": f"http://localhost:{server.port}"}
        ).status_code
        == 200
    )
