"""Property-based requests generated from our OpenAPI schema (schemathesis) against a real server:
well over a thousand of them, and not one may get a 5xx."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, settings

pytestmark = pytest.mark.slow


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
    settings_ = make_settings(
        tmp,
        agent_cache_dir=tmp / "cache",
        server_rate_limit_per_client=0,
        server_rate_limit_global=0,
        server_log_level="WARNING",
        server_max_body_mb=1,
    )
    server = ServerThread(settings_, loaded).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def api_schema(schemathesis_server):
    return schemathesis.openapi.from_url(f"{schemathesis_server.url}/openapi.json")


@pytest.fixture(scope="module")
def calls(schemathesis_server):
    """Every generated call of this module, by operation. When every operation of the schema ran
    (the whole module, in any order), well over a thousand calls must have been made: checked when
    the module's last test is done, so it holds whatever order the tests ran in."""
    made: dict[tuple[str, str], list[int]] = {}
    yield made
    operations = {
        (method.upper(), path)
        for path, methods in schemathesis_server.app.openapi()["paths"].items()
        for method in methods
    }
    if operations <= set(made):
        total = sum(len(codes) for codes in made.values())
        print(f"schemathesis: {total} requests over {len(made)} operations")
        assert total >= 1000, total


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=90, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
def test_no_generated_request_gets_a_server_error(case, calls):
    response = case.call(timeout=60)
    calls.setdefault((case.method.upper(), case.path), []).append(response.status_code)
    assert response.status_code < 500, (case.method, case.formatted_path, response.text[:300])
