import subprocess
import sys

import pytest

from semantic_core.config import ConfigError, Settings, load_settings


def test_defaults_are_those_of_a_local_tool(monkeypatch):
    for name in list(__import__("os").environ):
        if name.startswith("SEMANTIC_") or name == "ANTHROPIC_API_KEY":
            monkeypatch.delenv(name, raising=False)
    s = Settings(_env_file=None)
    assert s.server_host == "127.0.0.1"
    assert s.server_port == 8000
    assert s.server_rate_limit_per_client == 120 and s.server_rate_limit_global == 1000
    assert s.mlx_cache_budget_mb == 2048 and s.mlx_prefill_step_size == 512
    assert s.agent_max_agents_in_memory == 100
    assert s.api_keys == []
    assert str(s.agent_cache_dir).endswith(".cache/semantic")


def test_every_documented_variable_is_read(monkeypatch, tmp_path):
    env = {
        "SEMANTIC_SERVER_HOST": "0.0.0.0",
        "SEMANTIC_SERVER_PORT": "9123",
        "SEMANTIC_SERVER_WORKERS": "1",
        "SEMANTIC_SERVER_LOG_LEVEL": "production",
        "SEMANTIC_SERVER_CORS_ORIGINS": "http://a.test, http://b.test",
        "SEMANTIC_SERVER_RATE_LIMIT_PER_AGENT": "5",
        "SEMANTIC_SERVER_RATE_LIMIT_GLOBAL": "50",
        "SEMANTIC_MLX_MODEL_ID": "org/model",
        "SEMANTIC_MLX_CACHE_BUDGET_MB": "512",
        "SEMANTIC_MLX_MAX_BATCH_SIZE": "4",
        "SEMANTIC_MLX_PREFILL_STEP_SIZE": "256",
        "SEMANTIC_AGENT_CACHE_DIR": str(tmp_path),
        "SEMANTIC_AGENT_MAX_AGENTS_IN_MEMORY": "7",
        "ANTHROPIC_API_KEY": "key-one,key-two",
    }
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    s = load_settings()
    assert (s.server_host, s.server_port, s.server_log_level) == ("0.0.0.0", 9123, "PRODUCTION")
    assert s.server_cors_origins == ["http://a.test", "http://b.test"]
    assert (s.server_rate_limit_per_client, s.server_rate_limit_global) == (5, 50)
    assert (s.mlx_model_id, s.mlx_cache_budget_mb, s.mlx_max_batch_size, s.mlx_prefill_step_size) == (
        "org/model",
        512,
        4,
        256,
    )
    assert s.agent_cache_dir == tmp_path and s.agent_max_agents_in_memory == 7
    assert s.api_keys == ["key-one", "key-two"]
    public = s.public_dict()
    assert "key-one" not in str(public) and public["ANTHROPIC_API_KEY"] == "****, ****"


@pytest.mark.parametrize(
    ("name", "value", "needle"),
    [
        ("SEMANTIC_SERVER_PORT", "eighty", "SEMANTIC_SERVER_PORT"),
        ("SEMANTIC_SERVER_PORT", "70000", "SEMANTIC_SERVER_PORT"),
        ("SEMANTIC_MLX_CACHE_BUDGET_MB", "-1", "SEMANTIC_MLX_CACHE_BUDGET_MB"),
        ("SEMANTIC_SERVER_LOG_LEVEL", "LOUD", "SEMANTIC_SERVER_LOG_LEVEL"),
        ("SEMANTIC_SERVER_WORKERS", "4", "only 1 worker"),
    ],
)
def test_invalid_values_fail_with_one_line_naming_the_variable(monkeypatch, name, value, needle):
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError) as err:
        load_settings()
    message = str(err.value)
    assert needle in message and "\n" not in message


def test_cli_reports_a_bad_variable_and_exits_2():
    env = {"SEMANTIC_SERVER_PORT": "nope", "PATH": "/usr/bin:/bin"}
    proc = subprocess.run(
        [sys.executable, "-m", "semantic_tui.cli", "config"], env=env, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 2
    assert "SEMANTIC_SERVER_PORT" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_config_json_masks_secrets_and_shows_device_and_blas():
    import json
    import os

    env = {**os.environ, "ANTHROPIC_API_KEY": "sk-very-secret-key-123"}
    proc = subprocess.run(
        [sys.executable, "-m", "semantic_tui.cli", "config", "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert "sk-very-secret-key-123" not in proc.stdout
    data = json.loads(proc.stdout)
    assert data["runtime"]["device"] in ("cpu", "gpu (Metal)", "gpu (CUDA)")
    if sys.platform == "linux":
        assert data["runtime"]["blas"].startswith("openblas")
    assert data["settings"]["SEMANTIC_SERVER_HOST"] == os.environ.get("SEMANTIC_SERVER_HOST", "127.0.0.1")


def test_config_says_which_kv_format_the_model_gets():
    import json
    import os

    def kv_format(**env: str) -> str:
        proc = subprocess.run(
            [sys.executable, "-m", "semantic_tui.cli", "config", "--json"],
            env={**os.environ, **env},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode == 0, proc.stderr
        return str(json.loads(proc.stdout)["runtime"]["kv_format"])

    assert (
        kv_format(SEMANTIC_MLX_KV_BITS="4", SEMANTIC_MLX_KV_GROUP_SIZE="32") == "4-bit, group 32 (SEMANTIC_MLX_KV_BITS)"
    )
    assert kv_format(SEMANTIC_MLX_KV_BITS="none") == "the model dtype (SEMANTIC_MLX_KV_BITS)"
    assert kv_format(SEMANTIC_MLX_KV_BITS="auto", SEMANTIC_MLX_MODEL_ID="some/unmeasured-model") == (
        "the model dtype (the model's recommendation)"
    )
