"""Daemon configuration: edged.toml, then EDGED_* environment overrides.

Defaults (documented in README.md)::

    models_dir = "models"          # bundles: directories or .tar.gz
    state_dir = ".edged-state"     # unpacked archives, outbox, OTA state
    load = ["*"]                   # model names to load at start ("*": all)
    versions = "latest"            # "latest" or "all" versions of each model
    threads = 0                    # runtime threads per model, 0 = backend default
    max_concurrency = 2            # concurrent inferences per model version
    max_queue = 64                 # waiting requests per model version before 503
    [models.<name>]                # per model: dynamic batching (edged.batching), off by default
    max_batch_size = 0             # 0: off; >= 2: merge concurrent requests up to this many rows
    preferred_batch_sizes = []     # batch sizes to dispatch at once when reached
    max_queue_delay_us = 0         # how long a batch waits for more requests
    [http]
    host = "127.0.0.1"
    port = 8080
    max_body_bytes = 67108864      # 64 MiB; larger requests get 413
    tokens_file = ""               # + TLS, timeouts, limits: README "Security"
    [mqtt] / [push] / [ota]        # off by default; every key is in README.md

Every scalar can be overridden with EDGED_<KEY> or EDGED_<SECTION>_<KEY>
(e.g. EDGED_HTTP_PORT=9000, EDGED_MODELS_DIR=/srv/models).
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Mapping

from edged.errors import ConfigError


@dataclass
class HttpConfig:
    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = 8080
    max_body_bytes: int = 64 * 1024 * 1024
    # Run a request on the event loop instead of a worker thread when its model answers
    # in under this many microseconds on average (the thread hop costs more). 0: never.
    inline_max_us: float = 200.0
    # Access control (edged.auth; README "Security"). No tokens_file: open, loopback only.
    tokens_file: str = ""  # one "SCOPE TOKEN" line each; scope infer or admin
    public_health: bool = True  # health, metadata and /metrics answer without a token
    tls_cert_file: str = ""  # PEM certificate chain; with tls_key_file: HTTPS
    tls_key_file: str = ""
    tls_client_ca_file: str = ""  # mutual TLS: clients need a certificate from this CA
    allow_insecure: bool = False  # listen on a non-loopback address without TLS and tokens
    # Resource bounds (edged.http_limits).
    header_timeout_s: float = 10.0  # to receive a request's headers (slowloris)
    body_timeout_s: float = 30.0  # longest wait between two reads of a body
    idle_timeout_s: float = 30.0  # idle keep-alive connections are closed after this
    max_connections: int = 1000  # beyond it: 503 (capped by RLIMIT_NOFILE)
    max_inflight_bytes: int = 512 * 1024 * 1024  # bodies + tensors + responses in flight; beyond: 503


@dataclass
class MqttConfig:
    enabled: bool = False
    host: str = "127.0.0.1"
    port: int = 1883
    username: str = ""
    password: str = ""
    tls: bool = False
    ca_file: str = ""  # with tls: CA bundle ("" = system CAs)
    cert_file: str = ""  # client certificate (mutual TLS)
    key_file: str = ""
    topic_prefix: str = "edged"
    qos: int = 1
    keepalive: int = 30
    publish_http_results: bool = False  # also publish results of HTTP inference
    outbox_max_rows: int = 100_000
    outbox_max_bytes: int = 256 * 1024 * 1024  # summed payload bytes; 0 = no byte bound
    outbox_max_age_s: float = 7 * 86400.0
    outbox_drop_policy: str = "drop_oldest"  # or drop_newest
    reconnect_min_s: float = 1.0
    reconnect_max_s: float = 30.0


@dataclass
class PushConfig:
    enabled: bool = False
    url: str = "127.0.0.1:9091"  # Pushgateway host:port (or http://host:port)
    interval_s: float = 15.0
    timeout_s: float = 3.0
    job: str = "edged"
    delete_on_shutdown: bool = True


@dataclass
class OtaConfig:
    """Fleet model updates (see edged.ota)."""

    enabled: bool = False
    groups: list[str] = field(default_factory=list)  # fleet groups this device follows
    trusted_keys_dir: str = "/etc/edged/trusted-keys"
    allow_unsigned: bool = False  # development only: accept unsigned bundles and unsigned update intents
    # Devices download only from URLs under these prefixes ([] = any URL a signed intent names).
    allowed_url_prefixes: list[str] = field(default_factory=list)
    keep_versions: int = 3  # installed versions kept per model (the active one included)
    max_bundle_bytes: int = 2 * 1024 * 1024 * 1024
    download_timeout_s: float = 30.0  # per connection attempt and read
    download_retries: int = 5
    retry_backoff_s: float = 2.0
    health_window_s: float = 60.0  # after a swap: watch errors and restarts this long
    max_error_rate: float = 0.2  # inference failures / requests that trigger a rollback
    min_requests: int = 10  # requests needed before the error rate counts
    crash_loop_restarts: int = 3  # unclean restarts inside the window that trigger a rollback


@dataclass
class ModelSettings:
    """Per-model settings from a ``[models.<name>]`` table (Triton's dynamic batching keys)."""

    max_batch_size: int = 0  # 0: no batching; >= 2: merge concurrent requests up to this many rows
    preferred_batch_sizes: list[int] = field(default_factory=list)  # dispatched at once when reached
    max_queue_delay_us: int = 0  # how long the first request of a batch waits for more

    @property
    def batching(self) -> bool:
        return self.max_batch_size >= 2


@dataclass
class Config:
    models_dir: str = "models"
    state_dir: str = ".edged-state"
    load: list[str] = field(default_factory=lambda: ["*"])
    versions: str = "latest"
    threads: int = 0
    max_concurrency: int = 2
    max_queue: int = 64
    warmup_runs: int = 3
    log_level: str = "info"
    runtime_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    models: dict[str, ModelSettings] = field(default_factory=dict)  # [models.<name>] tables
    device_id: str = ""  # "" = this machine's hostname
    http: HttpConfig = field(default_factory=HttpConfig)
    mqtt: MqttConfig = field(default_factory=MqttConfig)
    push: PushConfig = field(default_factory=PushConfig)
    ota: OtaConfig = field(default_factory=OtaConfig)
    source: str = "<defaults>"

    @property
    def device(self) -> str:
        import socket

        return self.device_id or socket.gethostname()

    def resolve(self, path: str) -> Path:
        """A path from the config, relative to the config file's directory."""
        p = Path(path).expanduser()
        if p.is_absolute() or self.source.startswith("<"):
            return p
        return Path(self.source).parent / p

    def model_settings(self, name: str) -> ModelSettings:
        """The ``[models.<name>]`` settings of ``name`` (defaults when it has no table)."""
        return self.models.get(name) or ModelSettings()

    @property
    def models_path(self) -> Path:
        return self.resolve(self.models_dir)

    @property
    def state_path(self) -> Path:
        return self.resolve(self.state_dir)


def _coerce(value: Any, default: Any, where: str) -> Any:
    """Check/convert ``value`` to the type of ``default``."""
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            return value.lower() in ("1", "true", "yes", "on")
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if isinstance(default, int):
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        try:
            return int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected an integer, got {value!r}") from None
    if isinstance(default, float):
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
    if isinstance(default, list):
        if isinstance(value, str):
            return [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [str(v) for v in value]
    if isinstance(default, dict):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a table, got {value!r}")
        return value
    if isinstance(default, str):
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    return value


def _apply(target: Any, data: Mapping[str, Any], source: str, prefix: str = "") -> None:
    known = {f.name: f for f in fields(target) if f.name != "source"}
    for key, value in data.items():
        where = f"{source}: key {prefix}{key}"
        if key not in known:
            raise ConfigError(f"{where} is unknown; known keys: {', '.join(sorted(known))}")
        current = getattr(target, key)
        if target.__class__ is Config and key == "models":
            target.models = _model_tables(value, where)
        elif is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"{where}: expected a [{prefix}{key}] table")
            _apply(current, value, source, f"{prefix}{key}.")
        else:
            setattr(target, key, _coerce(value, current, where))


def _model_tables(value: Any, where: str) -> dict[str, ModelSettings]:
    """``[models.<name>]`` tables -> ModelSettings per model name."""
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: expected [models.<name>] tables")
    known = {f.name for f in fields(ModelSettings)}
    tables: dict[str, ModelSettings] = {}
    for name, table in value.items():
        if not isinstance(table, dict):
            raise ConfigError(f"{where}.{name}: expected a [models.{name}] table")
        settings = ModelSettings()
        for key, item in table.items():
            at = f"{where}.{name}.{key}"
            if key not in known:
                raise ConfigError(f"{at} is unknown; known keys: {', '.join(sorted(known))}")
            if key == "preferred_batch_sizes":
                items = item.split(",") if isinstance(item, str) else item
                if not isinstance(items, list):
                    raise ConfigError(f"{at}: expected a list of integers, got {item!r}")
                settings.preferred_batch_sizes = [_coerce(v, 0, at) for v in items if str(v).strip()]
            else:
                setattr(settings, key, _coerce(item, getattr(settings, key), at))
        tables[name] = settings
    return tables


def _env_overrides(target: Any, environ: Mapping[str, str], prefix: str = "EDGED_") -> None:
    for f in fields(target):
        if f.name in ("source", "models"):  # [models.<name>] tables come from the file only
            continue
        current = getattr(target, f.name)
        env_name = f"{prefix}{f.name.upper()}"
        if is_dataclass(current):
            _env_overrides(current, environ, f"{env_name}_")
        elif env_name in environ:
            setattr(target, f.name, _coerce(environ[env_name], current, f"environment {env_name}"))


def _validate(config: Config) -> None:
    src = config.source
    if config.versions not in ("latest", "all"):
        raise ConfigError(f"{src}: key versions must be 'latest' or 'all', got {config.versions!r}")
    if not 0 < config.http.port < 65536:
        raise ConfigError(f"{src}: key http.port must be 1-65535, got {config.http.port}")
    for key in ("max_concurrency", "max_queue"):
        if getattr(config, key) < 1:
            raise ConfigError(f"{src}: key {key} must be at least 1")
    if config.threads < 0:
        raise ConfigError(f"{src}: key threads must be 0 (default) or more")
    if config.mqtt.qos not in (0, 1, 2):
        raise ConfigError(f"{src}: key mqtt.qos must be 0, 1 or 2, got {config.mqtt.qos}")
    if config.mqtt.outbox_drop_policy not in ("drop_oldest", "drop_newest"):
        raise ConfigError(f"{src}: key mqtt.outbox_drop_policy must be drop_oldest or drop_newest")
    if config.mqtt.outbox_max_rows < 1 or config.mqtt.outbox_max_bytes < 0:
        raise ConfigError(f"{src}: keys mqtt.outbox_max_rows must be at least 1 and mqtt.outbox_max_bytes 0 or more")
    if not 0 < config.mqtt.port < 65536:
        raise ConfigError(f"{src}: key mqtt.port must be 1-65535, got {config.mqtt.port}")
    if config.push.interval_s <= 0:
        raise ConfigError(f"{src}: key push.interval_s must be positive")
    if config.ota.keep_versions < 2:
        raise ConfigError(f"{src}: key ota.keep_versions must be at least 2 (the active version and one to roll back to)")
    if not 0 < config.ota.max_error_rate <= 1:
        raise ConfigError(f"{src}: key ota.max_error_rate must be in (0, 1]")
    for key in ("download_timeout_s", "health_window_s"):
        if getattr(config.ota, key) <= 0:
            raise ConfigError(f"{src}: key ota.{key} must be positive")
    if config.http.inline_max_us < 0:
        raise ConfigError(f"{src}: key http.inline_max_us must be 0 (off) or more")
    if config.http.max_body_bytes < 1024:
        raise ConfigError(f"{src}: key http.max_body_bytes must be at least 1024")
    _validate_http(config, src)
    for name, settings in config.models.items():
        _validate_model(settings, f"{src}: [models.{name}]")


def _validate_model(settings: ModelSettings, where: str) -> None:
    size = settings.max_batch_size
    if size < 0 or size == 1:
        raise ConfigError(f"{where} max_batch_size must be 0 (no batching) or at least 2, got {size}")
    if settings.max_queue_delay_us < 0:
        raise ConfigError(f"{where} max_queue_delay_us must be 0 or more, got {settings.max_queue_delay_us}")
    preferred = settings.preferred_batch_sizes
    if preferred and not settings.batching:
        raise ConfigError(f"{where} preferred_batch_sizes needs max_batch_size of at least 2")
    bad = [p for p in preferred if not 1 <= p <= size]
    if bad:
        raise ConfigError(f"{where} preferred_batch_sizes must be between 1 and max_batch_size ({size}), got {bad}")


def _validate_http(config: Config, src: str) -> None:
    from edged.auth import TokenStore, check_exposure, tls_context

    http = config.http
    for key in ("header_timeout_s", "body_timeout_s", "idle_timeout_s"):
        if getattr(http, key) <= 0:
            raise ConfigError(f"{src}: key http.{key} must be positive")
    if http.max_connections < 1:
        raise ConfigError(f"{src}: key http.max_connections must be at least 1")
    if http.max_inflight_bytes < 1024:
        raise ConfigError(f"{src}: key http.max_inflight_bytes must be at least 1024 (it is raised to 2 x http.max_body_bytes)")
    if bool(http.tls_cert_file) != bool(http.tls_key_file):
        raise ConfigError(f"{src}: keys http.tls_cert_file and http.tls_key_file go together: set both or neither")
    if http.tls_client_ca_file and not http.tls_cert_file:
        raise ConfigError(f"{src}: key http.tls_client_ca_file (mutual TLS) needs http.tls_cert_file and http.tls_key_file")
    if http.enabled:
        refused = check_exposure(http.host, bool(http.tls_cert_file), bool(http.tokens_file), http.allow_insecure)
        if refused:
            raise ConfigError(f"{src}: {refused}")
        # Unreadable tokens or certificates: an error line now, not a traceback at start.
        if http.tokens_file:
            TokenStore.load(config.resolve(http.tokens_file))
        if http.tls_cert_file:
            ca = str(config.resolve(http.tls_client_ca_file)) if http.tls_client_ca_file else ""
            tls_context(str(config.resolve(http.tls_cert_file)), str(config.resolve(http.tls_key_file)), ca)


def load_config(path: str | Path | None = None, environ: Mapping[str, str] | None = None) -> Config:
    """Read ``path`` (when given), apply EDGED_* overrides, validate."""
    config = Config()
    if path is not None:
        path = Path(path)
        try:
            data = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path}: config file not found") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from None
        config.source = str(path.resolve())
        _apply(config, data, str(path))
    _env_overrides(config, os.environ if environ is None else environ)
    _validate(config)
    return config
