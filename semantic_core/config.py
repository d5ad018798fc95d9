"""Settings: the one place that reads configuration (environment variables and `.env`).

Every variable is documented in the README. Invalid values fail at start-up with one line naming the
variable (see `load_settings`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

from pydantic import AliasChoices, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

DEFAULT_MODEL_ALIAS = "smollm2-135m-instruct"

LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL", "PRODUCTION"]
WeightsMode = Literal["auto", "dense", "quantized"]
BlasChoice = Literal["auto", "openblas", "mkl", "reference"]
KVBits = Literal["auto", "none", "8", "4"]
BLAS_ENV = "SEMANTIC_MLX_BLAS"


def cache_root() -> Path:
    """The per-user cache folder, honouring XDG_CACHE_HOME."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "semantic"


def early_blas_choice() -> str:
    """The BLAS choice, read before MLX is imported (and so before Settings can be built).

    Same variable and values as `Settings.mlx_blas`; an invalid value is reported by `load_settings`.
    """
    value = os.environ.get(BLAS_ENV, "auto").strip().lower()
    return value if value in get_args(BlasChoice) else "auto"


def _split_csv(value: Any) -> Any:
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


class Settings(BaseSettings):
    """Effective configuration. Field `server_port` is read from SEMANTIC_SERVER_PORT, and so on."""

    model_config = SettingsConfigDict(
        env_prefix="SEMANTIC_",
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        validate_default=True,
    )

    # HTTP server
    server_host: str = Field("127.0.0.1", description="Address to bind; local tool, so loopback by default.")
    server_port: int = Field(8000, ge=0, le=65535, description="TCP port of the HTTP API (0 picks a free one).")
    server_workers: int = Field(1, ge=1, description="Worker processes; only 1 is supported (one model).")
    server_log_level: LogLevel = Field("INFO", description="DEBUG, INFO, WARNING, ERROR, or PRODUCTION (JSON).")
    server_cors_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Comma-separated origins allowed by CORS."
    )
    server_rate_limit_per_client: int = Field(
        120,
        ge=0,
        validation_alias=AliasChoices(
            "SEMANTIC_SERVER_RATE_LIMIT_PER_CLIENT",
            "SEMANTIC_SERVER_RATE_LIMIT_PER_AGENT",  # the name before limits were per client
            "server_rate_limit_per_client",
        ),
        description="Requests per minute per client: per API key, or per address without keys (0 = off).",
    )
    server_rate_limit_global: int = Field(1000, ge=0, description="Requests per minute in all (0 = off).")
    server_max_body_mb: float = Field(8.0, gt=0, description="Largest request body accepted, in MB.")
    server_max_output_tokens: int = Field(
        4096,
        ge=1,
        description="Most tokens one API answer may ask for: a larger max_tokens (Claude Code asks 32,000-64,000) "
        "is lowered to this, and the response says so in the x-semantic-max-tokens header.",
    )
    server_max_queue: int = Field(256, ge=1, description="Waiting requests beyond which the API answers 529.")
    server_drain_seconds: float = Field(30.0, ge=0, description="Graceful shutdown: wait for in-flight requests.")
    server_allowed_hosts: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Comma-separated Host header values accepted (besides loopback names and the bind "
        "address); '*' accepts any. Refusing other hosts stops DNS-rebinding pages from reading agents.",
    )
    server_model_aliases: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["claude-*"],
        description="Comma-separated model names (fnmatch patterns) also served by the loaded model, so "
        "clients that ask for a Claude model work unchanged; other unknown names get 404.",
    )

    # Model and engine
    mlx_model_id: str = Field(
        DEFAULT_MODEL_ALIAS,
        description="Model: the default alias, a local mlx-lm directory, a local .gguf file, or a HF repo id.",
    )
    mlx_cache_budget_mb: float = Field(2048, gt=0, description="KV cache budget of hot agents, in MB.")
    mlx_max_batch_size: int = Field(8, ge=1, le=256, description="Sequences decoded together at most.")
    mlx_prefill_step_size: int = Field(512, ge=16, description="Prompt tokens computed per prefill chunk.")
    mlx_block_tokens: int = Field(64, ge=16, le=1024, description="Tokens per KV block of the block pool.")
    mlx_default_max_tokens: int = Field(512, ge=1, description="max_tokens when a caller gives none.")
    # Sampling when neither the request, the agent nor the model says (see semantic_core/turns.py for the
    # policy; the values are chosen by benchmarks/sampling_defaults.py).
    mlx_default_temperature: float = Field(0.0, ge=0.0, le=2.0, description="Temperature when none is given.")
    mlx_default_top_p: float = Field(1.0, gt=0.0, le=1.0, description="top_p when none is given.")
    mlx_default_top_k: int = Field(0, ge=0, description="top_k when none is given (0: off).")
    mlx_default_min_p: float = Field(0.0, ge=0.0, lt=1.0, description="min_p when none is given (0: off).")
    mlx_default_repetition_penalty: float = Field(
        1.0, gt=0.0, le=10.0, description="Repetition penalty when none is given (1: off)."
    )
    mlx_model_sampling: bool = Field(
        True, description="Use the model's own generation defaults (generation_config.json) before the settings'."
    )
    mlx_weights: WeightsMode = Field(
        "auto", description="auto: dense float32 on CPU, quantized on GPU; or force dense / quantized."
    )
    mlx_blas: BlasChoice = Field(
        "auto", description="CPU BLAS: auto (OpenBLAS, else MKL, else reference), openblas, mkl, reference."
    )
    mlx_blas_decode_threads: int = Field(
        1, ge=0, description="CPU BLAS threads during decode steps (0: leave the BLAS's default)."
    )
    mlx_blas_prefill_threads: int = Field(
        0, ge=0, description="CPU BLAS threads during prefill (0: one per core but one)."
    )
    mlx_kv_bits: KVBits = Field(
        "auto",
        description=(
            "KV cache precision in memory and on disk: none (the model's dtype), 8 or 4 bits; auto: the "
            "model's measured recommendation (benchmarks/kv_quant.py)."
        ),
    )
    mlx_kv_group_size: int = Field(64, description="Values per scale of a quantized KV cache: 32, 64 or 128.")
    mlx_numpy_exp: bool = Field(
        True, description="On CPU, exponentials of prompt attention and SwiGLU by NumPy (MLX's are slow there)."
    )
    mlx_cpu_layer_kernels: bool = Field(
        True,
        description="On CPU with the kernels built: RMS norm, RoPE, SwiGLU and decode attention as one primitive "
        "each (MLX runs them there as graphs of small ops, each a dispatch).",
    )
    mlx_cpu_pipeline_layers: int = Field(
        3,
        ge=0,
        description="On CPU, a decode step is handed to MLX every this many layers, so MLX computes while "
        "Python builds the rest of the step (0: once per step).",
    )
    model_dir: Path = Field(
        default_factory=lambda: cache_root() / "models",
        description="Where fetched and converted models are kept.",
    )

    # Agents
    agent_cache_dir: Path = Field(
        default_factory=lambda: cache_root(), description="Where agents and their KV caches are saved."
    )
    agent_max_agents_in_memory: int = Field(100, ge=1, description="Hot agents at most.")
    agent_max_agents: int = Field(
        10_000,
        ge=1,
        description="Agents at most (hot and on disk). When full, the least recently used agent created "
        "without a name is recycled for a new one; named agents are never recycled (a clear 400 instead).",
    )
    agent_max_system_prompt_chars: int = Field(
        200_000, ge=1, description="Longest system prompt an agent stores, in characters."
    )
    agent_save_on_finish: bool = Field(
        True, description="Write an agent to disk after every turn (crash-safe), not only on eviction."
    )

    # Cluster: several `semantic serve` sharing one SEMANTIC_AGENT_CACHE_DIR behind a proxy
    cluster_instance: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$",
        description="This instance's name in a cluster of instances sharing one agent folder (unset: the "
        "folder has one user). Each agent is then owned by one instance at a time (a lock per agent): "
        "a survivor takes over a dead instance's agents from their files, and a live owner hands one "
        "over when asked.",
    )
    cluster_url: str | None = Field(
        None,
        description="The URL other instances use to reach this one for handoffs (default: "
        "http://SEMANTIC_SERVER_HOST:SEMANTIC_SERVER_PORT).",
    )
    cluster_handoff_seconds: float = Field(
        10.0,
        gt=0,
        description="How long a request waits for another live instance to hand its agent over before "
        "it is answered 529 (retryable).",
    )

    # Distributed: one model over several processes (`semantic serve --ranks N`)
    distributed_backend: Literal["any", "ring", "mpi"] = Field(
        "any",
        description="mx.distributed backend of `semantic serve --ranks N` / `--distributed`: mpi (OpenMPI's "
        "mpirun; blocks politely, fastest here), ring (TCP, no dependency; its ranks poll while they wait), "
        "or any (mpi when mpirun is installed, else ring).",
    )

    # Auth
    anthropic_api_key: SecretStr | None = Field(
        None,
        validation_alias=AliasChoices("ANTHROPIC_API_KEY", "SEMANTIC_ANTHROPIC_API_KEY"),
        description="Comma-separated API keys; unset means no authentication.",
    )

    @field_validator("server_cors_origins", "server_model_aliases", "server_allowed_hosts", mode="before")
    @classmethod
    def _csv(cls, value: Any) -> Any:
        return _split_csv(value)

    @field_validator("mlx_kv_bits", mode="before")
    @classmethod
    def _kv_bits(cls, value: Any) -> Any:
        return str(value).strip().lower() if isinstance(value, (str, int)) else value

    @field_validator("mlx_kv_group_size")
    @classmethod
    def _kv_group(cls, value: int) -> int:
        if value not in (32, 64, 128):
            raise ValueError("must be 32, 64 or 128")
        return value

    @field_validator("server_log_level", "mlx_weights", "mlx_blas", mode="before")
    @classmethod
    def _normalise_case(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = value.strip()
            return value.upper() if value.upper() in get_args(LogLevel) else value.lower()
        return value

    @field_validator("server_workers")
    @classmethod
    def _one_worker(cls, value: int) -> int:
        if value != 1:
            raise ValueError(
                "only 1 worker is supported: each worker would load its own model and split the agents "
                "(one process serves many agents through continuous batching)"
            )
        return value

    @field_validator("model_dir", "agent_cache_dir", mode="after")
    @classmethod
    def _expand(cls, value: Path) -> Path:
        return value.expanduser()

    # Derived values -------------------------------------------------------------------------------

    @property
    def api_keys(self) -> list[str]:
        if self.anthropic_api_key is None:
            return []
        return [k.strip() for k in self.anthropic_api_key.get_secret_value().split(",") if k.strip()]

    @property
    def allowed_hosts(self) -> set[str]:
        """Host names (without port) the API answers to: loopback names, the bind address, and
        SEMANTIC_SERVER_ALLOWED_HOSTS. Contains '*' when any host is accepted."""
        hosts = {"localhost", "127.0.0.1", "::1"}
        if self.server_host not in ("0.0.0.0", "::", ""):
            hosts.add(self.server_host.strip("[]").lower())
        hosts.update(h.strip().strip("[]").lower() for h in self.server_allowed_hosts if h.strip())
        return hosts

    @property
    def agents_dir(self) -> Path:
        return self.agent_cache_dir / "agents"

    @property
    def quarantine_dir(self) -> Path:
        return self.agent_cache_dir / "quarantine"

    @property
    def owners_dir(self) -> Path:
        return self.agent_cache_dir / "owners"

    @property
    def cluster_advertised_url(self) -> str:
        if self.cluster_url:
            return self.cluster_url.rstrip("/")
        host = self.server_host if self.server_host not in ("0.0.0.0", "::", "") else "127.0.0.1"
        host = f"[{host}]" if ":" in host and not host.startswith("[") else host
        return f"http://{host}:{self.server_port}"

    def public_dict(self) -> dict[str, Any]:
        """Effective settings by environment variable name, secrets masked."""
        out: dict[str, Any] = {}
        for name, field in type(self).model_fields.items():
            value = getattr(self, name)
            env = env_name(name)
            if isinstance(value, SecretStr):
                keys = [k for k in value.get_secret_value().split(",") if k.strip()]
                value = ", ".join(_mask(k.strip()) for k in keys)
            elif isinstance(value, Path):
                value = str(value)
            out[env] = value
            del field
        return out


def env_name(field_name: str) -> str:
    field = Settings.model_fields[field_name]
    alias = field.validation_alias
    if isinstance(alias, AliasChoices):
        return str(alias.choices[0])
    return f"SEMANTIC_{field_name.upper()}"


def _mask(secret: str) -> str:
    if len(secret) <= 8:
        return "****"
    return f"{secret[:3]}…{secret[-2:]} ({len(secret)} chars)"


class ConfigError(Exception):
    """A setting has an invalid value; the message is one line naming the variable."""


def load_settings(**overrides: Any) -> Settings:
    """Build Settings, turning validation errors into one clear line per bad variable."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            loc = err.get("loc") or ("?",)
            field = str(loc[0])
            name = env_name(field) if field in Settings.model_fields else field
            given = err.get("input")
            shown = "" if isinstance(given, dict) or given is None else f" (got {given!r})"
            msg = err.get("msg", "invalid value").removeprefix("Value error, ")
            lines.append(f"{name}: {msg}{shown}")
        raise ConfigError("; ".join(lines)) from None
