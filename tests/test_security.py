"""With API keys set, every non-probe endpoint refuses a missing or wrong key; keys never reach the
logs; the default bind is loopback; agent ids cannot escape the cache folder."""

from __future__ import annotations

import io
import re

import httpx

from semantic_core.observability import configure_logging, flush_logging

KEYS = "sk-first-secret-0001,sk-second-secret-0002"
# "/" tells what answers here and nothing else (Claude Code checks it with HEAD /, without a key).
OPEN = ("/", "/health/live", "/health/ready", "/health/startup", "/metrics")


def test_every_non_probe_route_needs_a_valid_key(server_factory):
    server = server_factory(anthropic_api_key=KEYS)
    paths = server.app.openapi()["paths"]
    checked = 0
    for template, operations in paths.items():
        path = re.sub(r"\{[^}]+\}", "some-agent", template)
        for method in operations:
            for headers in ({}, {"x-api-key": "sk-wrong"}, {"authorization": "Bearer sk-wrong"}):
                r = httpx.request(method.upper(), f"{server.url}{path}", headers=headers, json={})
                if template in OPEN:
                    assert r.status_code != 401, (method, path)
                else:
                    assert r.status_code == 401, (method, path, headers, r.status_code)
                    assert r.json()["error"]["type"] == "authentication_error"
                checked += 1
    assert checked > 40
    # The docs and schema are behind the key too.
    assert httpx.get(f"{server.url}/openapi.json").status_code == 401
    assert httpx.get(f"{server.url}/openapi.json", headers={"x-api-key": "sk-first-secret-0001"}).status_code == 200


def test_api_keys_never_appear_in_logs(server_factory):
    stream = io.StringIO()
    configure_logging("DEBUG", stream=stream)
    try:
        server = server_factory(anthropic_api_key=KEYS, server_log_level="DEBUG")
        for headers in (
            {"x-api-key": "sk-first-secret-0001"},
            {"authorization": "Bearer sk-second-secret-0002"},
            {"x-api-key": "sk-wrong-but-secret-9999"},
        ):
            httpx.post(
                f"{server.url}/v1/messages",
                headers=headers,
                json={"model": "tiny", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]},
            )
            httpx.get(f"{server.url}/v1/agents", headers=headers)
        flush_logging()
    finally:
        configure_logging("WARNING")
    text = stream.getvalue()
    assert "request" in text and "/v1/messages" in text  # the requests were logged...
    for secret in ("sk-first-secret-0001", "sk-second-secret-0002", "sk-wrong-but-secret-9999"):
        assert secret not in text  # ...without their keys


def test_default_bind_is_loopback(monkeypatch):
    from semantic_core.config import Settings

    monkeypatch.delenv("SEMANTIC_SERVER_HOST", raising=False)
    assert Settings(_env_file=None).server_host == "127.0.0.1"


def test_agent_ids_cannot_traverse_paths(api, tmp_path):
    for bad in ("..", "../../etc/passwd", "a/../../b", ".hidden", "x" * 100, "a b", "%2e%2e"):
        r = httpx.post(f"{api.url}/v1/agents", json={"id": bad})
        assert r.status_code == 400, bad
        r = httpx.post(
            f"{api.url}/v1/messages",
            headers={"x-agent-id": bad},
            json={"model": "tiny", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]},
        )
        assert r.status_code == 400, bad
    outside = [p for p in tmp_path.rglob("*.safetensors") if "agents" not in p.parts]
    assert outside == []
