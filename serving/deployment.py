"""The Ray Serve edge: one autoscaled deployment = engine(s) + the OpenAI FastAPI ingress.

- ``build_application(ServeConfig)``: the typed builder ``raylm serve`` uses.
- ``build_app(args)``: the app builder for Serve config YAMLs / ``serve run`` / KubeRay
  ``serveConfigV2`` (``import_path: serving.deployment:build_app``), taking a raylm YAML path and/or
  an inline ``serve`` section.
- ``serve_forever(cfg)``: deploy, print the URL, block until Ctrl-C or SIGTERM, then remove the
  app (and Serve with it when no other app runs on it).

Several models behind one endpoint are routed by the request's ``model`` field; each replica keeps an
LRU of loaded engines through ``serve.multiplexed`` (clients may also send the
``serve_multiplexed_model_id`` header so the router prefers replicas that already hold the model).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from ray import serve

from serving.backend import Backend, load_backend
from serving.config import ServeConfig
from serving.engine import RequestStats
from serving.openai_api import ApiSettings, build_openai_app, load_api_keys

__all__ = [
    "AppArgs",
    "OpenAIDeployment",
    "build_app",
    "build_application",
    "load_serve_config",
    "serve_forever",
    "start",
    "stop",
]

log = logging.getLogger("raylm.serving.deployment")
_DRAIN_POLL_S = 0.2


class _RayMetrics:
    """EngineObserver recording request metrics through Ray's metrics API (Prometheus export).

    One set of metric objects per process, tagged by model, so multiplexed engines share them.
    """

    _shared: dict[str, Any] | None = None
    _BUCKETS_S = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120]

    def __init__(self, model: str) -> None:
        self._tags = {"model": model}
        self._last_gauge = 0.0
        self._last_counts = (-1, -1)  # (running, waiting) last recorded
        self._m = self._metrics()

    @classmethod
    def _metrics(cls) -> dict[str, Any]:
        if cls._shared is None:
            from ray.util import metrics

            tags = ("model",)
            cls._shared = {
                "e2e": metrics.Histogram(
                    "raylm_request_latency_s",
                    "Submit to last token, by outcome.",
                    boundaries=cls._BUCKETS_S,
                    tag_keys=("model", "outcome"),
                ),
                "ttft": metrics.Histogram(
                    "raylm_ttft_s", "Submit to first token.", cls._BUCKETS_S, tag_keys=tags
                ),
                "tps": metrics.Histogram(
                    "raylm_decode_tokens_per_s",
                    "Per-request decode speed after the first token.",
                    boundaries=[1, 5, 10, 25, 50, 100, 250, 500, 1000, 5000],
                    tag_keys=tags,
                ),
                "tokens": metrics.Counter(
                    "raylm_completion_tokens", "Generated tokens.", tag_keys=tags
                ),
                "running": metrics.Gauge(
                    "raylm_running_sequences", "Sequences in the batch.", tag_keys=tags
                ),
                "waiting": metrics.Gauge("raylm_waiting_sequences", "Queue depth.", tag_keys=tags),
            }
        return cls._shared

    def request_finished(self, stats: RequestStats) -> None:
        m = self._m
        m["e2e"].observe(stats.e2e_s, tags={**self._tags, "outcome": stats.outcome})
        if stats.ttft_s is not None:
            m["ttft"].observe(stats.ttft_s, tags=self._tags)
            decode_s = stats.e2e_s - stats.ttft_s
            if stats.completion_tokens > 1 and decode_s > 0:
                m["tps"].observe((stats.completion_tokens - 1) / decode_s, tags=self._tags)
        if stats.completion_tokens:
            m["tokens"].inc(stats.completion_tokens, tags=self._tags)

    def step(self, running: int, waiting: int) -> None:
        now = time.monotonic()
        # A step can take ~1 ms: gauges at most twice a second, except the step that empties the
        # engine (its thread then sleeps, and a throttled gauge would report load forever).
        idle = running == 0 and waiting == 0
        if now - self._last_gauge < 0.5 and not (idle and self._last_counts != (0, 0)):
            return
        self._last_gauge, self._last_counts = now, (running, waiting)
        self._m["running"].set(running, tags=self._tags)
        self._m["waiting"].set(waiting, tags=self._tags)


class _Loaded:
    """What the multiplexed LRU holds; eviction stops the engine off the event loop."""

    def __init__(
        self, engine: Backend, grace_s: float, on_evict: Callable[[Backend], None]
    ) -> None:
        self.engine, self._grace_s, self._on_evict = engine, grace_s, on_evict

    def __del__(self) -> None:
        # Serve's LRU calls this on eviction (and GC may too): never block the replica's loop.
        self._on_evict(self.engine)
        threading.Thread(target=self.engine.shutdown, args=(self._grace_s,), daemon=True).start()


class _ReplicaModels:
    """ModelProvider over the replica's multiplexed loader."""

    def __init__(self, names: list[str], load: Callable[[str], Awaitable[_Loaded]]) -> None:
        self._names, self._load = names, load
        self.ready = False
        self.loaded: dict[str, Backend] = {}

    def model_names(self) -> list[str]:
        return list(self._names)

    def engines(self) -> list[tuple[str, Backend]]:
        """(name, engine) pairs, copied: health checks and stats run off the event loop, which may
        load or evict a model meanwhile."""
        return list(self.loaded.items())

    def forget(self, engine: Backend) -> None:
        """Drop an evicted engine (only that object: the name may already be loaded again)."""
        for name, e in self.engines():
            if e is engine:
                del self.loaded[name]

    async def get(self, name: str) -> Backend:
        loaded = await self._load(name)
        self.loaded[name] = loaded.engine
        return loaded.engine

    def is_ready(self) -> bool:
        return self.ready and all(e.is_ready() for _, e in self.engines() if not e.closing)


@serve.deployment(name="OpenAIDeployment")
@serve.ingress()
class OpenAIDeployment:
    """One replica: loads the default model (then warms it) before reporting healthy."""

    async def __init__(self, serve_config: dict[str, Any]) -> None:
        self.cfg = ServeConfig.model_validate(serve_config)
        self._entries = {m.name: m for m in self.cfg.models}
        engine_cfg = self.cfg.engine
        if engine_cfg.torch_threads is None:
            # One replica per `num_cpus`: do not let torch grab every core of the node.
            threads = max(1, int(self.cfg.num_cpus or 1))
            engine_cfg = engine_cfg.model_copy(update={"torch_threads": threads})
        self._engine_cfg = engine_cfg

        async def load(name: str) -> _Loaded:
            # Loading blocks for seconds: keep the loop serving the other models' streams.
            m = self._entries[name]
            engine = await asyncio.to_thread(
                load_backend, m.path, self._engine_cfg, _RayMetrics(name), m.adapter
            )
            return _Loaded(engine, self.cfg.graceful_shutdown_timeout_s, self.models.forget)

        multiplexed = serve.multiplexed(max_num_models_per_replica=self.cfg.max_models_per_replica)
        self.models = _ReplicaModels(list(self._entries), multiplexed(load))
        await self.models.get(self.cfg.models[0].name)
        self.models.ready = True

    def __serve_build_asgi_app__(self) -> Any:
        keys = load_api_keys(self.cfg.api_keys_env, self.cfg.api_keys_file)
        settings = ApiSettings(
            api_keys=keys,
            max_body_bytes=self.cfg.max_body_bytes,
            retry_after_s=self.cfg.retry_after_s,
            stream_interval=self.cfg.stream_interval,
        )
        return build_openai_app(self.models, settings)

    async def engine_stats(self) -> dict[str, dict[str, float]]:
        """Per loaded model: running and waiting sequences and request/token counters.

        For operators and tests through a handle:
        ``serve.get_deployment_handle("OpenAIDeployment", app).engine_stats.remote().result()``
        (one replica's view; the same numbers go to Ray's metrics).
        """
        return {name: e.stats() for name, e in self.models.engines()}

    def check_health(self) -> None:
        """Serve restarts a replica whose engine thread died."""
        dead = [n for n, e in self.models.engines() if not e.closing and not e.is_ready()]
        if dead:
            raise RuntimeError(f"engine not running for {dead}")

    async def __del__(self) -> None:
        # Serve already waited for in-flight requests (graceful_shutdown_timeout_s); stop the engines,
        # failing anything still running with an error event instead of cutting the stream.
        engines = [e for _, e in self.models.engines()] if hasattr(self, "models") else []
        await asyncio.gather(*(asyncio.to_thread(e.shutdown, 1.0) for e in engines))


def _absolute_models(cfg: ServeConfig, base: Path) -> ServeConfig:
    def absolute(p: str | None) -> str | None:
        return None if p is None else str((base / p).resolve())

    models = [
        m.model_copy(update={"path": absolute(m.path), "adapter": absolute(m.adapter)})
        for m in cfg.models
    ]
    return cfg.model_copy(update={"models": models})


def build_application(cfg: ServeConfig) -> Any:
    """The Serve application for a validated ``serve`` section (model paths made absolute)."""
    if not cfg.models:
        raise ValueError("serve.models: list at least one {name, path} to serve")
    cfg = _absolute_models(cfg, Path.cwd())
    for m in cfg.models:
        if not (Path(m.path) / "config.json").is_file():
            raise ValueError(f"serve.models.{m.name}: {m.path} is not an exported HF model dir")
        if m.adapter and not (Path(m.adapter) / "adapter_config.json").is_file():
            raise ValueError(f"serve.models.{m.name}: {m.adapter} is not a PEFT adapter dir")
    a = cfg.autoscaling
    autoscaling = a.model_dump(exclude_none=True)
    env = {"TOKENIZERS_PARALLELISM": "false"}
    if cfg.direct_ingress:  # read by the replica alone: the proxy keeps serving cfg.port
        env["RAY_SERVE_ENABLE_DIRECT_INGRESS"] = "1"
    env["RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD"] = "1" if cfg.user_code_thread else "0"
    deployment = OpenAIDeployment.options(
        autoscaling_config=autoscaling,
        max_ongoing_requests=cfg.resolved_max_ongoing(),
        max_queued_requests=cfg.max_queued_requests,
        max_replicas_per_node=cfg.max_replicas_per_node,
        ray_actor_options={
            "num_cpus": cfg.num_cpus,
            "num_gpus": cfg.num_gpus,
            "runtime_env": {"env_vars": env},
        },
        health_check_period_s=cfg.health_check_period_s,
        health_check_timeout_s=cfg.health_check_timeout_s,
        graceful_shutdown_timeout_s=cfg.graceful_shutdown_timeout_s,
        # How often a stopping replica looks for in-flight requests left: it sleeps one period
        # before the first look, so Serve's 2 s default is the least any replica takes to stop
        # (each scale-down, each `raylm serve` exit). The look is a counter read.
        graceful_shutdown_wait_loop_s=_DRAIN_POLL_S,
    )
    return deployment.bind(cfg.model_dump(mode="json"))


class AppArgs(BaseModel):
    """Arguments of :func:`build_app` (``args:`` in a Serve config, ``key=value`` on ``serve run``)."""

    model_config = ConfigDict(extra="forbid")

    config: str | None = Field(None, description="A raylm YAML; its `serve` section is used.")
    overrides: list[str] = Field(
        default_factory=list, description="Dotted `serve.key=value` overrides, as with --set."
    )
    serve: dict[str, Any] | None = Field(
        None, description="Inline `serve` section (beats the file)."
    )


def _set_dotted(tree: dict[str, Any], item: str) -> None:
    key, sep, raw = item.partition("=")
    parts = key.strip().split(".")
    if not sep or parts[0] != "serve" or len(parts) < 2:
        raise ValueError(f"override {item!r}: expected serve.key=value")
    node = tree
    for part in parts[1:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = yaml.safe_load(raw) if raw else ""


def load_serve_config(
    path: str | None = None, overrides: list[str] | None = None, inline: dict | None = None
) -> ServeConfig:
    """The `serve` section from a raylm YAML (+ inline section, + overrides), validated.

    Reads only that section, so serving never imports the other stages' schemas.
    """
    tree: dict[str, Any] = {}
    if path is not None:
        loaded = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        tree = dict(loaded.get("serve") or {})
    tree.update(inline or {})
    for item in overrides or []:
        _set_dotted(tree, item)
    try:
        return ServeConfig.model_validate(tree)
    except ValidationError as err:
        where = path or "<args>"
        lines = [f"{where}: serve.{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors()]
        raise ValueError("\n".join(lines)) from None


def build_app(args: dict[str, Any]) -> Any:
    """App builder for ``serve run serving.deployment:build_app config=configs/serve.yaml``."""
    parsed = AppArgs.model_validate(args)
    # Relative model paths are relative to the working dir, like every raylm path.
    cfg = load_serve_config(parsed.config, parsed.overrides, parsed.serve)
    return build_application(cfg)


def _deploy_failure(app_name: str) -> str:
    """The last line of each failed deployment's status: the replica's exception (e.g. a missing
    model dir or backend), which Serve's own deploy error leaves out."""
    try:
        app = serve.status().applications.get(app_name)
    except Exception:  # the status is a courtesy: never hide the deploy error behind another
        return ""
    deployments = app.deployments.values() if app is not None else []
    return "\n".join(d.message.strip().splitlines()[-1] for d in deployments if d.message.strip())


def start(cfg: ServeConfig) -> str:
    """Start Serve's HTTP proxy on cfg.host:cfg.port, deploy, wait until healthy. Returns the base URL."""
    serve.start(
        proxy_location=cfg.proxy_location, http_options={"host": cfg.host, "port": cfg.port}
    )
    try:
        serve.run(build_application(cfg), name=cfg.app_name, route_prefix=cfg.route_prefix)
    except RuntimeError as exc:
        detail = _deploy_failure(cfg.app_name)
        raise RuntimeError(f"{exc}\n{detail}" if detail else str(exc)) from exc
    prefix = cfg.route_prefix.rstrip("/")
    return f"http://{cfg.host}:{cfg.port}{prefix}/v1"


def stop(cfg: ServeConfig) -> None:
    """Remove this endpoint's app; shut Serve down with it when no other app runs on Serve.

    Runs in ``finally``: it logs instead of raising, so a deploy error is never replaced by a
    cleanup error.
    """
    try:
        # Empty when Serve never started (serve.shutdown then only logs that nothing runs).
        apps = set(serve.status().applications)
        # One call either way: `ray job stop` SIGKILLs the command 3 s after its SIGTERM, and
        # Serve's controller finishes either call on its own once it was sent.
        if apps <= {cfg.app_name}:
            serve.shutdown()
        elif cfg.app_name in apps:
            serve.delete(cfg.app_name)
    except Exception as exc:  # Ray or Serve already gone, or the delete timed out
        log.warning("raylm serve: could not remove app %r: %s", cfg.app_name, exc)


def serve_forever(cfg: ServeConfig, poll_s: float = 1.0) -> None:
    """``raylm serve``: deploy, print the URL, block until Ctrl-C or SIGTERM, then remove the app.

    A deploy that fails or is interrupted half-way is removed too, so no replica outlives the
    command; other apps on the same Serve instance are left running.
    """
    try:
        url = start(cfg)
        names = ", ".join(m.name for m in cfg.models)
        print(f"raylm serve: {names} at {url} (OpenAI-compatible; Ctrl-C to stop)", flush=True)
        if cfg.direct_ingress:
            print(f"raylm serve: replicas also answer on {cfg.host}, ports from 30000 "
                  "(serve.direct_ingress)", flush=True)  # fmt: skip
        while True:
            time.sleep(poll_s)
    finally:
        stop(cfg)
