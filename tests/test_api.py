"""The Anthropic Messages API over a real server on a free port, with the official SDK as client."""

from __future__ import annotations

import json

import anthropic
import httpx
import pytest

T0 = {"temperature": 0}
MODEL = "tiny"


def user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def test_create_returns_an_anthropic_message(client, api):
    raw = client.messages.with_raw_response.create(
        model=MODEL, max_tokens=10, messages=user("Hello, world!"), extra_body=T0
    )
    msg = raw.parse()
    assert msg.id.startswith("msg_") and msg.type == "message" and msg.role == "assistant"
    assert msg.model == MODEL
    assert msg.content[0].type == "text" and msg.content[0].text
    assert msg.stop_reason == "max_tokens" and msg.usage.output_tokens == 10
    assert msg.usage.input_tokens > 0 and msg.usage.cache_read_input_tokens == 0
    assert raw.headers["request-id"].startswith("req_")
    assert raw.headers["x-agent-id"]
    assert raw.headers["x-response-time"].endswith("ms")


def test_stream_text_equals_the_final_message(client):
    with client.messages.stream(
        model=MODEL, max_tokens=30, messages=user("The quick brown fox"), extra_body=T0
    ) as stream:
        pieces = list(stream.text_stream)
        final = stream.get_final_message()
    assert "".join(pieces) == final.content[0].text
    assert len(pieces) > 1
    assert final.stop_reason == "max_tokens" and final.usage.output_tokens == 30


def test_stream_event_order_on_the_wire(api):
    body = {"model": MODEL, "max_tokens": 5, "stream": True, "messages": user("hi"), "temperature": 0}
    with httpx.stream("POST", f"{api.url}/v1/messages", json=body, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    names = [line.split(": ", 1)[1] for line in lines if line.startswith("event: ")]
    assert names[:3] == ["message_start", "content_block_start", "ping"]
    assert names[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert set(names[3:-3]) <= {"content_block_delta", "ping"}
    datas = [json.loads(line[6:]) for line in lines if line.startswith("data: ")]
    assert all(d["type"] == n for d, n in zip(datas, names, strict=True))


def test_multi_turn_reuse_shows_in_cache_read_tokens(client):
    headers = {"x-agent-id": "conversation-1"}
    first = client.messages.create(
        model=MODEL, max_tokens=8, messages=user("What is the capital of France?"), extra_headers=headers, extra_body=T0
    )
    assert first.usage.cache_read_input_tokens == 0
    prompt_one = first.usage.input_tokens
    second = client.messages.create(
        model=MODEL,
        max_tokens=8,
        extra_headers=headers,
        extra_body=T0,
        messages=[
            *user("What is the capital of France?"),
            {"role": "assistant", "content": first.content[0].text},
            *user("And Germany?"),
        ],
    )
    assert second.usage.cache_read_input_tokens >= prompt_one
    total = second.usage.input_tokens + second.usage.cache_read_input_tokens
    assert second.usage.input_tokens < total / 2


def test_agent_header_names_the_agent_and_creates_it(client, api):
    raw = client.messages.with_raw_response.create(
        model=MODEL, max_tokens=3, messages=user("hi"), extra_headers={"x-agent-id": "named-agent"}, extra_body=T0
    )
    assert raw.headers["x-agent-id"] == "named-agent"
    agents = httpx.get(f"{api.url}/v1/agents").json()["data"]
    assert "named-agent" in [a["id"] for a in agents]


def test_stop_sequences_end_the_answer(client):
    free = client.messages.create(model=MODEL, max_tokens=40, messages=user("Hello, world!"), extra_body=T0)
    text = free.content[0].text
    stop = next(
        text[i : i + 3]
        for i in range(4, len(text) - 3)
        if text[i : i + 3].isprintable() and text[i : i + 3].strip() and text.find(text[i : i + 3]) == i
    )
    stopped = client.messages.create(
        model=MODEL, max_tokens=40, messages=user("Hello, world!"), stop_sequences=[stop], extra_body=T0
    )
    assert stopped.stop_reason == "stop_sequence" and stopped.stop_sequence == stop
    assert stopped.content[0].text == text[: text.find(stop)]


def test_system_prompts_as_string_blocks_and_messages(client):
    a = client.messages.create(model=MODEL, max_tokens=6, system="Be terse.", messages=user("hi"), extra_body=T0)
    b = client.messages.create(
        model=MODEL,
        max_tokens=6,
        messages=user("hi"),
        extra_body=T0,
        system=[{"type": "text", "text": "Be terse.", "cache_control": {"type": "ephemeral"}}],
    )
    c = client.messages.create(
        model=MODEL, max_tokens=6, extra_body=T0, messages=[{"role": "system", "content": "Be terse."}, *user("hi")]
    )
    assert a.content[0].text == b.content[0].text == c.content[0].text


def test_unknown_fields_are_tolerated(api):
    body = {
        "model": MODEL,
        "max_tokens": 3,
        "messages": user("hi"),
        "temperature": 0,
        "some_future_option": {"x": 1},
        "metadata": {"user_id": "u1"},
        "tools": [],
    }
    assert httpx.post(f"{api.url}/v1/messages", json=body, timeout=60).status_code == 200


@pytest.mark.parametrize(
    ("block", "needle"),
    [
        ({"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AAAA"}}, "image"),
        ({"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": "x"}}, "document"),
        ({"type": "tool_result", "tool_use_id": "t1", "content": "x"}, "tool"),
    ],
)
def test_blocks_the_model_cannot_use_are_400_not_500(client, block, needle):
    with pytest.raises(anthropic.BadRequestError) as err:
        client.messages.create(model=MODEL, max_tokens=5, messages=[{"role": "user", "content": [block]}])
    assert needle in err.value.message and "messages.0.content.0" in err.value.message


def test_validation_errors_name_the_field(client):
    with pytest.raises(anthropic.BadRequestError, match="max_tokens"):
        client.messages.create(model=MODEL, max_tokens=0, messages=user("hi"))
    with pytest.raises(anthropic.BadRequestError, match="messages"):
        client.messages.create(model=MODEL, max_tokens=5, messages=[])


def test_malformed_json_is_400_in_the_anthropic_envelope(api):
    r = httpx.post(
        f"{api.url}/v1/messages",
        content=b'{"model": "tiny", "max_tok',
        timeout=30,
        headers={"content-type": "application/json"},
    )
    assert r.status_code == 400
    assert r.json()["type"] == "error" and r.json()["error"]["type"] == "invalid_request_error"
    assert "JSON" in r.json()["error"]["message"]
    assert r.headers["request-id"]


def test_wrong_types_and_empty_messages(api):
    for body, field in [
        ({"model": MODEL, "max_tokens": "many", "messages": user("x")}, "max_tokens"),
        ({"model": MODEL, "max_tokens": 5, "messages": "hello"}, "messages"),
        ({"model": MODEL, "max_tokens": 5, "messages": [{"role": "robot", "content": "x"}]}, "role"),
    ]:
        r = httpx.post(f"{api.url}/v1/messages", json=body, timeout=30)
        assert r.status_code == 400, body
        assert field in r.json()["error"]["message"]


def test_unknown_model_is_404(client):
    with pytest.raises(anthropic.NotFoundError, match="not served here"):
        client.messages.create(model="gpt-4o", max_tokens=5, messages=user("hi"))


def test_claude_model_names_are_served_by_the_local_model(client):
    msg = client.messages.create(model="claude-local-test", max_tokens=3, messages=user("hi"), extra_body=T0)
    assert msg.model == MODEL


def test_prompt_over_context_is_400_with_both_numbers(client, api):
    limit = api.engine.info.context_length
    with pytest.raises(anthropic.BadRequestError) as err:
        client.messages.create(model=MODEL, max_tokens=5, messages=user("tick " * (limit + 100)))
    assert str(limit) in err.value.message and "context limit" in err.value.message


def test_huge_body_is_413(server_factory):
    server = server_factory(server_max_body_mb=0.01)
    r = httpx.post(
        f"{server.url}/v1/messages", json={"model": MODEL, "max_tokens": 5, "messages": user("x" * 50_000)}, timeout=30
    )
    assert r.status_code == 413 and r.json()["error"]["type"] == "request_too_large"


def test_count_tokens_and_models(client, api):
    count = client.messages.count_tokens(model=MODEL, messages=user("hello there"))
    assert count.input_tokens == len(api.engine.render(user("hello there")).tokens)
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL] and models.has_more is False
    assert models.first_id == models.last_id == MODEL
    assert client.models.retrieve(MODEL).type == "model"
    with pytest.raises(anthropic.NotFoundError):
        client.models.retrieve("nope")


def test_beta_query_parameter_is_accepted(api):
    r = httpx.post(
        f"{api.url}/v1/messages?beta=true", json={"model": MODEL, "max_tokens": 2, "messages": user("hi")}, timeout=30
    )
    assert r.status_code == 200


def test_unknown_endpoint_is_404_envelope(api):
    r = httpx.get(f"{api.url}/v1/nothing-here")
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"


def test_auth_refuses_missing_and_wrong_keys_but_probes_stay_open(server_factory):
    server = server_factory(anthropic_api_key="secret-key-1,secret-key-2")
    good = anthropic.Anthropic(base_url=server.url, api_key="secret-key-2", max_retries=0)
    assert good.messages.create(model=MODEL, max_tokens=2, messages=user("hi")).content
    with pytest.raises(anthropic.AuthenticationError, match="invalid API key"):
        anthropic.Anthropic(base_url=server.url, api_key="wrong", max_retries=0).models.list()
    r = httpx.get(f"{server.url}/v1/models")
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    bearer = httpx.get(f"{server.url}/v1/models", headers={"authorization": "Bearer secret-key-1"})
    assert bearer.status_code == 200
    for path in ("/health/live", "/health/ready", "/health/startup", "/metrics"):
        assert httpx.get(f"{server.url}{path}").status_code == 200, path
    for path in ("/v1/agents", "/v1/messages/count_tokens", "/v1/messages"):
        assert httpx.post(f"{server.url}{path}", json={}).status_code == 401, path


def test_rate_limit_per_client_is_429_with_retry_after_and_renaming_agents_does_not_dodge_it(server_factory):
    server = server_factory(server_rate_limit_per_client=2)
    c = anthropic.Anthropic(base_url=server.url, api_key="x", max_retries=0)
    for name in ("limited-1", "limited-2"):
        c.messages.create(model=MODEL, max_tokens=1, messages=user("hi"), extra_headers={"x-agent-id": name})
    # A third agent name from the same client is the same client.
    with pytest.raises(anthropic.RateLimitError) as err:
        c.messages.create(model=MODEL, max_tokens=1, messages=user("hi"), extra_headers={"x-agent-id": "limited-3"})
    assert int(err.value.response.headers["retry-after"]) >= 1
    assert "client" in err.value.response.json()["error"]["message"]


def test_global_rate_limit(server_factory):
    server = server_factory(server_rate_limit_global=3, server_rate_limit_per_client=0)
    codes = [httpx.get(f"{server.url}/v1/models").status_code for _ in range(5)]
    assert codes[:3] == [200, 200, 200] and codes[3:] == [429, 429]


def test_two_servers_in_one_process_count_only_their_own_requests(server_factory):
    first, second = server_factory(), server_factory()
    for _ in range(7):
        assert httpx.get(f"{first.url}/v1/models").status_code == 200

    def served(server, path: str) -> float:
        text = httpx.get(f"{server.url}/metrics").text
        return sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("semantic_request_total{") and f'path="{path}"' in line
        )

    assert served(first, "/v1/models") == 7
    assert served(second, "/v1/models") == 0
    assert first.engine.metrics.registry is not second.engine.metrics.registry


def test_probes(api):
    assert httpx.get(f"{api.url}/health/live").json() == {"status": "ok"}
    assert httpx.get(f"{api.url}/health/startup").json()["status"] == "started"
    ready = httpx.get(f"{api.url}/health/ready")
    assert ready.status_code == 200 and ready.json()["status"] == "ready"


def test_metrics_use_route_templates(client, api):
    client.messages.create(model=MODEL, max_tokens=2, messages=user("hi"), extra_headers={"x-agent-id": "m1"})
    httpx.get(f"{api.url}/v1/agents/m1")
    text = httpx.get(f"{api.url}/metrics").text
    for name in (
        "semantic_request_total",
        "semantic_request_duration_seconds_bucket",
        "semantic_pool_utilization_ratio",
        "semantic_agents_active",
        "semantic_cache_hit_total",
        "semantic_time_to_first_token_seconds_bucket",
        "semantic_tokens_per_second",
        "semantic_queue_depth",
        "semantic_evictions_total",
        "semantic_quarantined_files_total",
    ):
        assert name in text, name
    assert 'path="/v1/agents/{agent_id}"' in text
    assert 'path="/v1/agents/m1"' not in text


def test_agents_api(api):
    base = f"{api.url}/v1/agents"
    created = httpx.post(base, json={"id": "helper", "display_name": "Helper", "system_prompt": "Be kind."})
    assert created.status_code == 201 and created.json()["tier"] == "hot"
    assert httpx.post(base, json={"id": "helper"}).status_code == 400  # exists
    c = anthropic.Anthropic(base_url=api.url, api_key="x", max_retries=0)
    c.messages.create(model=MODEL, max_tokens=4, messages=user("hello"), extra_headers={"x-agent-id": "helper"})
    got = httpx.get(f"{base}/helper").json()
    assert got["tokens"] > 0 and [m["role"] for m in got["history"]] == ["user", "assistant"]
    assert httpx.patch(f"{base}/helper", json={"display_name": "Kind helper"}).json()["display_name"] == "Kind helper"
    assert httpx.post(f"{base}/helper/save", json={}).json()["saved"] is True
    assert httpx.post(f"{base}/helper/evict", json={}).json()["tier"] == "cold"
    assert httpx.post(f"{base}/helper/pin", json={}).json()["tier"] == "hot"
    assert httpx.post(f"{base}/helper/unpin", json={}).json()["pinned"] is False
    fork = httpx.post(f"{base}/helper/fork", json={"id": "helper-2"})
    assert fork.status_code == 201 and fork.json()["forked_from"] == "helper"
    listed = httpx.get(base).json()
    assert {a["id"] for a in listed["data"]} >= {"helper", "helper-2"} and listed["has_more"] is False
    assert httpx.delete(f"{base}/helper-2").json()["deleted"] is True
    missing = httpx.get(f"{base}/helper-2")
    assert missing.status_code == 404 and missing.json()["error"]["type"] == "not_found_error"
    assert httpx.get(f"{base}/..%2Fetc").status_code in (400, 404)
    assert httpx.post(base, json={"id": "../escape"}).status_code == 400


def test_client_disconnect_cancels_generation(api):
    body = {"model": MODEL, "max_tokens": 5000, "stream": True, "messages": user("go on forever"), "temperature": 0}
    with httpx.stream("POST", f"{api.url}/v1/messages", json=body, timeout=60, headers={"x-agent-id": "leaver"}) as r:
        for line in r.iter_lines():
            if "content_block_delta" in line:
                break
    import time

    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        snap = api.engine.snapshot(fresh=True)
        if snap.running == 0:
            break
        time.sleep(0.1)
    assert snap.running == 0
    info = next(a for a in snap.agents if a.id == "leaver")
    assert 0 < info.tokens < 5000


def test_a_named_agents_own_system_prompt_applies_when_the_request_gives_none(client, api):
    httpx.post(f"{api.url}/v1/agents", json={"id": "poet", "system_prompt": "You answer in rhyme. " * 5})
    with_agent = client.messages.create(
        model=MODEL, max_tokens=1, messages=user("hi"), extra_body=T0, extra_headers={"x-agent-id": "poet"}
    )
    plain = client.messages.create(
        model=MODEL, max_tokens=1, messages=user("hi"), extra_body=T0, extra_headers={"x-agent-id": "prose"}
    )
    total = with_agent.usage.input_tokens + with_agent.usage.cache_read_input_tokens
    assert total > plain.usage.input_tokens + 20
    assert client.models.retrieve("claude-local-test").id == MODEL  # aliases resolve like in /v1/messages


def test_labelled_counters_exist_before_their_first_event(api):
    text = httpx.get(f"{api.url}/metrics").text
    # Present from the start (the registry is per process, so other tests may have counted some).
    assert 'semantic_agent_saves_total{result="error"}' in text
    assert 'semantic_evictions_total{reason="preempt"}' in text
    assert "semantic_ready 1.0" in text
