"""Property-based requests generated from our OpenAPI schema (schemathesis) against a real server:
well over a thousand of them, and not one may get a 5xx."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, settings

pytestmark = pytest.mark.slow
REQUESTS: list[int] = []


@pytest.fixture(scope="module")
def schemathesis_server(tmp_path_factory):
    from semantic_core.model.loader import load_resolved
    from semantic_core.model.registry import ResolvedModel
    from tests.api_server import ServerThread
    from tests.conftest import make_settings
    from tests.tiny_model import build_tiny_model

    tmp = tmp_path_factory.mktemp("schemathesis")
    # A short context keeps every generated max_tokens cheap on the tiny model.
    loaded = load_resolved(ResolvedModel("tiny", build_tiny_model(tmp / "model", context=256), "local-dir"))
    settings_ = make_settings(tmp, agent_cache_dir=tmp / "cache", server_rate_limit_per_agent=0,
                              server_rate_limit_global=0, server_log_level="WARNING", server_max_body_mb=1)
    server = ServerThread(settings_, loaded).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def api_schema(schemathesis_server):
    return schemathesis.openapi.from_url(f"{schemathesis_server.url}/openapi.json")


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=90, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
def test_no_generated_request_gets_a_server_error(case):
    response = case.call(timeout=60)
    REQUESTS.append(response.status_code)
    assert response.status_code < 500, (case.method, case.formatted_path, response.text[:300])


def test_enough_requests_were_made():
    # Runs after the parametrized test above (pytest keeps file order).
    print(f"schemathesis: {len(REQUESTS)} requests, status codes {sorted(set(REQUESTS))}")
    assert len(REQUESTS) >= 1000, len(REQUESTS)
    assert not [code for code in REQUESTS if code >= 500]
