"""mnist-serve settings: one typed object, from flags or MNIST_SERVING_* variables.

Built once in __main__ (or by a test) and passed in; nothing reads configuration at import
time. A bad value stops start-up with a message naming the setting (exit code 2).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import Field, FilePath, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from .cpus import usable_cpus


class Settings(BaseSettings):
    """Serve the MNIST SavedModel over gRPC and HTTP. Every flag is also an environment
    variable: --model-dir is MNIST_SERVING_MODEL_DIR, and so on. `mnist-serve keys
    add|list|remove` manages an --auth-keys file."""

    model_config = SettingsConfigDict(
        env_prefix="MNIST_SERVING_",
        cli_prog_name="mnist-serve",
        cli_kebab_case=True,
        cli_implicit_flags=True,
        protected_namespaces=(),
        frozen=True,
    )

    model_dir: Path = Field(
        Path("models/mnist"), description="base path holding <version>/ SavedModel folders"
    )
    model_name: str = Field("mnist", min_length=1, description="the name requests address")
    host: str = Field("0.0.0.0", description="address to listen on")
    port: int = Field(8500, ge=0, le=65535, description="gRPC port (0 picks a free one)")
    http_port: int = Field(
        8501,
        ge=0,
        le=65535,
        description="HTTP port: TF Serving REST (/v1), KServe v2 REST (/v2) and /metrics "
        "(0 picks a free one)",
    )
    metrics_port: int | None = Field(
        None,
        ge=0,
        le=65535,
        description="also serve /metrics on a port of its own (off by default: /metrics is "
        "on the HTTP port)",
    )
    max_images_per_request: int = Field(
        4096, ge=1, le=65536, description="largest batch one request may carry"
    )
    batching: bool = Field(True, description="merge concurrent requests into one model call")
    max_batch_size: int = Field(1024, ge=1, description="images per model call, at most")
    batch_timeout_ms: float = Field(
        0.0,
        ge=0,
        le=1000,
        description="how long the oldest queued request may wait for others to join; "
        "batches also form while the model is busy",
    )
    max_queued_images: int = Field(
        16384,
        ge=1,
        description="online images waiting for the model before new online calls are shed",
    )
    max_queued_batch_images: int = Field(
        16384,
        ge=1,
        description="batch-class images waiting for the model before new batch calls are "
        "shed (a queue of their own: batch jobs never take the online calls' room)",
    )
    # Measured with bench.mixed (docs/operations/priorities.md): chunks of 256 cost an online
    # call waiting behind one about 0.5 ms on the 2-core machine, and keep the batch job's
    # throughput within a few percent of whole 1,024-image calls.
    batch_chunk_images: int = Field(
        256,
        ge=1,
        description="batch-class work runs in model calls of at most this many images, so "
        "that an online call waits for at most one such chunk",
    )
    batch_every: int = Field(
        4,
        ge=1,
        description="while online calls keep the model busy, one model call in this many "
        "still runs batch-class work, so batch jobs are never starved",
    )
    batch_nice: int = Field(
        10,
        ge=0,
        le=19,
        description="the nice value of the thread that runs batch-class model calls: above "
        "0, the OS runs the threads that answer online calls first when they compete for a "
        "core (0: batch work runs at the server's own priority)",
    )
    poll_interval: float = Field(
        2.0, ge=0, description="seconds between scans of --model-dir for versions (0: load once)"
    )
    version_policy: Literal["latest", "all", "specific"] = Field(
        "latest", description="which versions to serve"
    )
    num_latest: int = Field(1, ge=1, description="how many newest versions 'latest' keeps")
    versions: list[int] = Field(default_factory=list, description="the versions 'specific' serves")
    grace_period: float = Field(
        10.0, ge=0, description="seconds in-flight calls get to finish on SIGTERM"
    )
    # 1 by default: one copy of the model in memory (~740 MB with TensorFlow), and on the
    # 2-core machines measured so far a second worker competes with the clients for the
    # same cores (1.1-1.3x). Raise it where bench/workers.py shows the gain.
    workers: int = Field(
        1,
        ge=1,
        le=256,
        description="N or auto: server processes sharing the ports, restarted when they die; "
        "auto is one per CPU this process may use (affinity mask, cgroup quota). Each "
        "loads the model",
    )
    # Long enough that reconnecting costs nothing (one handshake per connection per 5
    # minutes), short enough that connections rebalance within minutes of a restart.
    max_connection_age: float = Field(
        300.0,
        ge=0,
        description="seconds after which a client connection is asked to reconnect, so that "
        "long-lived clients spread over the workers again (0: never)",
    )
    runtime: Literal["auto", "litert", "tensorflow"] = Field(
        "auto",
        description="what runs a version: auto (its LiteRT twin when it has one, else "
        "TensorFlow), litert (twins only), tensorflow (the SavedModel, always)",
    )
    drain_delay: float = Field(
        0.0,
        ge=0,
        description="seconds the server keeps answering after SIGTERM, health already "
        "NOT_SERVING, so that balancers and clients move away; then, once no call has arrived "
        "for 0.1 s (at most 1 s after the signal), it stops accepting and gives in-flight "
        "calls --grace-period (a second signal ends the delay early)",
    )
    tls_cert: FilePath | None = Field(
        None, description="PEM certificate chain: serve gRPC over TLS (re-read when it changes)"
    )
    tls_key: FilePath | None = Field(None, description="PEM private key of --tls-cert")
    tls_client_ca: FilePath | None = Field(
        None, description="PEM CA bundle: require client certificates it signed (mutual TLS)"
    )
    health_port: int | None = Field(
        None,
        ge=0,
        le=65535,
        description="a plaintext port serving only grpc.health.v1 (0 picks a free one): "
        "for probes that cannot speak TLS, such as Kubernetes' grpc probes",
    )
    max_concurrent_streams: int = Field(
        128, ge=1, description="calls one connection may have open at once; more wait client-side"
    )
    keepalive_time: float = Field(
        60.0, gt=0, description="seconds of silence before the server pings a connection"
    )
    keepalive_timeout: float = Field(
        20.0, gt=0, description="seconds to wait for a ping's answer before dropping a connection"
    )
    min_ping_interval: float = Field(
        5.0,
        ge=0,
        description="clients that ping more often than this get GOAWAY (after two strikes); "
        "the project's client pings every 10 s",
    )
    max_connection_idle: float = Field(
        300.0, ge=0, description="close connections without calls for this long (0: never)"
    )
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    verbose_tensorflow: bool = Field(
        False, description="let TensorFlow and LiteRT print their start-up logs (CUDA, XNNPACK)"
    )
    ui: bool = Field(
        True,
        description="serve the page for people at / (draw a digit, see the ten "
        "probabilities) and the API's docs at /docs; /openapi.json is always served",
    )
    ui_samples: FilePath | None = Field(
        None,
        description="an .npz in Keras' MNIST layout (x_test, y_test), such as the MNIST "
        "file: the page at / offers a few of its test images (none by default)",
    )
    cors_origins: list[str] = Field(
        default_factory=list,
        description="origins whose browser pages may call the HTTP port (CORS), e.g. "
        "https://a.example,http://localhost:3000, or * for any (off by default)",
    )
    access_log: str | None = Field(
        None,
        description="write one JSON line per call to this file (appended), or - for stdout "
        "(off by default)",
    )
    access_log_sample_rate: float = Field(
        1.0, ge=0, le=1, description="the share of calls the access log gets a line for"
    )
    access_log_queue_size: int = Field(
        10000,
        ge=1,
        description="access log lines waiting for the writer; beyond it lines are dropped "
        "(and counted), never the calls",
    )
    prediction_log: Path | None = Field(
        None,
        description="write a prediction log into this folder: rotating Parquet files, one "
        "row per image (time, request ID, caller, version, priority, class, probabilities; "
        "the input with --log-inputs), feedback rows, and each version's training reference "
        "(off by default; needs the monitoring extra, pyarrow)",
    )
    prediction_log_url: str | None = Field(
        None,
        description="send the prediction log to this http(s) URL as CloudEvents, in the shape "
        "KServe's payload logger sends (org.kubeflow.serving.inference.response; off by "
        "default)",
    )
    prediction_log_sample: float = Field(
        1.0,
        ge=0,
        le=1,
        description="the share of inference calls the prediction log records (a sampled "
        "call logs all its images)",
    )
    log_inputs: bool = Field(
        False,
        description="the prediction log also keeps each image (784 uint8 pixels; float32 "
        "images scaled back to 0-255), and the URL sink sends the request events",
    )
    prediction_log_max_rows: int = Field(
        100_000,
        ge=1,
        description="a prediction log file is closed and published (renamed to *.parquet) "
        "once it holds this many rows (a call's rows are never split)",
    )
    prediction_log_max_seconds: float = Field(
        60.0,
        gt=0,
        description="a prediction log file is also published once it is this old, and at shutdown",
    )
    prediction_log_queue_size: int = Field(
        100_000,
        ge=1,
        description="prediction log rows (images) waiting for each sink's writer; beyond it "
        "records are dropped (and counted), never the calls",
    )
    prediction_log_url_batch: int = Field(
        1,
        ge=1,
        le=10_000,
        description="CloudEvents per POST to --prediction-log-url: 1 sends each in binary "
        "mode, as KServe does (ce-* headers, the body the event's data); more sends up to "
        "that many per POST in CloudEvents' batched JSON mode",
    )
    tracing: bool = Field(
        False,
        description="OpenTelemetry tracing (needs the otel extra): a span per call, exported "
        "over OTLP as the standard OTEL_* variables say (OTEL_SDK_DISABLED=true turns it off)",
    )
    auth_keys: FilePath | None = Field(
        None,
        description="API keys: a JSON file of key names, roles (read, predict), SHA-256s of "
        "their tokens and optional per-key limits (made by `mnist-serve keys add`); every "
        "call but health then needs `Authorization: Bearer <token>`. Re-read when it changes "
        "(off by default)",
    )
    metrics_auth: bool = Field(
        False, description="with --auth-keys: /metrics needs a valid key too (any role)"
    )
    max_connections: int = Field(
        0,
        ge=0,
        description="connections the gRPC port and the HTTP port each keep open at once (per "
        "worker); more are closed as they arrive (HTTP: after a 503). 0: auto, half of the "
        "open-file limit less 256 for the server's own files, at most 10000",
    )
    http_header_timeout: float = Field(
        10.0,
        gt=0,
        description="seconds an HTTP client has to send a request's headers in full, from "
        "the connection's opening or, on a kept-alive connection, from the request's first "
        "byte (also for the TLS handshake); then the connection is closed",
    )
    http_body_timeout: float = Field(
        60.0,
        gt=0,
        description="seconds an HTTP client has to send a request's body in full once its "
        "headers arrived; then it gets 408 and the connection is closed",
    )

    drift: bool = Field(
        True,
        description="drift signals: compare recent traffic with each version's training "
        "reference (gauges and histograms on /metrics)",
    )
    drift_window: int = Field(
        10000,
        ge=100,
        le=1_000_000,
        description="images in the sliding window of live traffic that the drift gauges "
        "compare with each version's training reference (per worker)",
    )
    drift_sample_rate: float = Field(
        1.0,
        gt=0,
        le=1,
        description="the share of calls whose images the drift signals see (each call drawn "
        "at random): lower it to cut their cost on a CPU-bound server; the windows then span "
        "longer",
    )
    drift_min_images: int = Field(
        1000,
        ge=1,
        description="images a version's window must hold before its drift gauges are shown "
        "(a handful of images is not a distribution)",
    )
    drift_interval: float = Field(
        1.0,
        gt=0,
        le=60,
        description="seconds between updates of the drift gauges and histograms (the call "
        "path only records each call's statistics)",
    )
    feedback_window: int = Field(
        100000,
        ge=0,
        le=10_000_000,
        description="recent predictions (images, per worker) that feedback labels can be "
        "joined to; older ones are forgotten, and their labels answered unknown. 0: off",
    )

    @field_validator("workers", mode="before")
    @classmethod
    def _auto_workers(cls, value: object) -> object:
        if isinstance(value, str) and value.strip().lower() == "auto":
            return usable_cpus()
        return value

    @field_validator("cors_origins")
    @classmethod
    def _origins(cls, origins: list[str]) -> list[str]:
        for origin in origins:
            if origin != "*" and not re.fullmatch(r"https?://[^/\s]+", origin):
                raise ValueError(
                    f"CORS origin {origin!r} is not scheme://host[:port] (no path) nor *"
                )
        return origins

    @field_validator("prediction_log_url")
    @classmethod
    def _log_url(cls, url: str | None) -> str | None:
        if url is not None and not re.fullmatch(r"https?://[^/\s?#]+(/\S*)?", url):
            raise ValueError(f"prediction log URL {url!r} is not http(s)://host[:port][/path]")
        return url

    @model_validator(mode="after")
    def _check(self) -> Settings:
        ports = [p for p in (self.port, self.http_port, self.metrics_port) if p]
        if len(ports) != len(set(ports)):
            raise ValueError("--port, --http-port and --metrics-port must differ")
        if self.max_batch_size > self.max_queued_images:
            raise ValueError("max_batch_size must not exceed max_queued_images")
        if self.version_policy == "specific" and not self.versions:
            raise ValueError("version_policy 'specific' needs --versions, e.g. --versions 1,2")
        if any(v < 1 for v in self.versions):
            raise ValueError("versions are positive integers")
        if self.drift_min_images > self.drift_window:
            raise ValueError("drift_min_images must not exceed drift_window")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("TLS needs both --tls-cert and --tls-key")
        if self.metrics_auth and self.auth_keys is None:
            raise ValueError("--metrics-auth needs --auth-keys")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("--tls-client-ca (mutual TLS) needs --tls-cert and --tls-key")
        return self

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None
