"""The `serve` config section, the Serve app builder's argument handling and `raylm serve` errors."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from serving.config import ServeConfig

REPO = Path(__file__).resolve().parents[2]


def test_defaults_bind_locally_and_admit_in_the_app_before_serve_queues():
    cfg = ServeConfig()
    assert cfg.host == "127.0.0.1"
    # Serve's own cap sits above engine slots + waiting queue, so overload is our OpenAI-shaped 503.
    assert cfg.resolved_max_ongoing() > cfg.engine.max_num_seqs + cfg.engine.max_waiting


@pytest.mark.parametrize(
    "bad, match",
    [
        ({"autoscaling": {"min_replicas": 3, "max_replicas": 2}}, "min_replicas"),
        ({"autoscaling": {"initial_replicas": 5, "max_replicas": 2}}, "initial_replicas"),
        ({"models": [{"name": "a", "path": "x"}, {"name": "a", "path": "y"}]}, "duplicate"),
        ({"engine": {"max_num_seqs": 0}}, "max_num_seqs"),
        ({"engine": {"max_num_seq": 4}}, "max_num_seq"),
        ({"port": 70000}, "port"),
        ({"max_replicas_per_node": 0}, "max_replicas_per_node"),
        ({"max_replicas_per_node": 101}, "max_replicas_per_node"),
        ({"proxy_location": "Everywhere"}, "proxy_location"),
    ],
)
def test_invalid_sections_are_rejected(bad, match):
    with pytest.raises(ValidationError, match=match):
        ServeConfig.model_validate(bad)


def test_shipped_serve_yaml_loads_through_both_entry_points():
    from cluster.config import load_config
    from serving.deployment import load_serve_config

    path = REPO / "configs" / "serve.yaml"
    assert load_config(path).serve == load_serve_config(str(path))
    cfg = load_serve_config(str(path), ["serve.port=9100", "serve.engine.max_num_seqs=4"])
    assert (cfg.port, cfg.engine.max_num_seqs) == (9100, 4)


def test_app_builder_argument_errors_name_the_key(tmp_path):
    from serving.deployment import build_app, load_serve_config

    with pytest.raises(ValueError, match=r"serve\.engine\.max_num_seqs"):
        load_serve_config(None, ["serve.engine.max_num_seqs=zero"])
    with pytest.raises(ValueError, match="expected serve.key=value"):
        load_serve_config(None, ["engine.max_num_seqs=2"])
    with pytest.raises(ValueError, match="at least one"):
        build_app({})
    with pytest.raises(ValueError, match="not an exported HF model dir"):
        build_app({"serve": {"models": [{"name": "m", "path": str(tmp_path)}]}})
    with pytest.raises(ValidationError):
        build_app({"confg": "typo.yaml"})


def test_app_builder_returns_a_serve_application(tiny_model_dir):
    from ray.serve import Application

    from serving.deployment import build_app

    app = build_app({"serve": {"models": [{"name": "m", "path": str(tiny_model_dir)}]}})
    assert isinstance(app, Application)


def test_replicas_per_node_reaches_the_serve_deployment(tiny_model_dir):
    from serving.config import ServeConfig
    from serving.deployment import build_application

    models = [{"name": "m", "path": str(tiny_model_dir)}]
    for limit in (None, 1, 3):
        cfg = ServeConfig(models=models, max_replicas_per_node=limit, num_cpus=0.5)
        # What Serve's controller schedules by (the multi-node test shows the effect).
        replica = build_application(cfg)._bound_deployment._replica_config
        assert replica.max_replicas_per_node == limit
        assert replica.ray_actor_options["num_cpus"] == 0.5


def test_direct_ingress_is_set_on_the_replicas_only_and_needs_a_proxy(tiny_model_dir):
    from serving.config import ServeConfig
    from serving.deployment import build_application

    models = [{"name": "m", "path": str(tiny_model_dir)}]
    for on in (False, True):
        replica = build_application(ServeConfig(models=models, direct_ingress=on))
        env = replica._bound_deployment._replica_config.ray_actor_options["runtime_env"]["env_vars"]
        assert env.get("RAY_SERVE_ENABLE_DIRECT_INGRESS") == ("1" if on else None)
    with pytest.raises(ValidationError, match="direct_ingress"):
        ServeConfig(models=models, direct_ingress=True, proxy_location="Disabled")


def test_raylm_serve_without_models_is_a_config_error(capsys):
    from cluster.cli import main

    assert main(["serve"]) == 2
    assert "serve.models" in capsys.readouterr().err
    assert main(["serve", "--set", "serve.engine.nope=1"]) == 2
    assert "serve.engine.nope: unknown key" in capsys.readouterr().err


def test_shipped_serve_app_yaml_is_a_valid_serve_config():
    import yaml
    from ray.serve.schema import ServeDeploySchema

    from serving.deployment import AppArgs, load_serve_config

    raw = yaml.safe_load((REPO / "serving" / "serve_app.yaml").read_text())
    schema = (
        ServeDeploySchema.model_validate(raw)
        if hasattr(ServeDeploySchema, "model_validate")
        else ServeDeploySchema.parse_obj(raw)
    )
    (app,) = schema.applications
    assert app.import_path == "serving.deployment:build_app"
    args = AppArgs.model_validate(app.args)
    cfg = load_serve_config(str(REPO / args.config), args.overrides)
    assert cfg.host == "0.0.0.0" and cfg.models


class _StubEngine:
    def __init__(self):
        self.closing, self.stopped = False, False

    def shutdown(self, timeout_s=0.0):
        self.closing = self.stopped = True

    def is_ready(self):
        return not self.closing


def test_evicted_engines_are_forgotten_and_stopped_off_the_event_loop():
    import asyncio
    import time

    from serving.deployment import _Loaded, _ReplicaModels

    engines = {"a": _StubEngine(), "b": _StubEngine()}
    lru = {}  # Serve's multiplexer holds the loaded objects

    async def load(name):
        lru[name] = _Loaded(engines[name], 0.0, models.forget)
        return lru[name]

    models = _ReplicaModels(["a", "b"], load)
    asyncio.run(models.get("a"))
    asyncio.run(models.get("b"))
    models.ready = True
    assert models.is_ready() and set(models.loaded) == {"a", "b"}
    lru.pop("a").__del__()  # what Serve's LRU does on eviction (GC may call it again: harmless)
    assert set(models.loaded) == {"b"}
    deadline = time.monotonic() + 5
    while not engines["a"].stopped and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engines["a"].stopped and models.is_ready()


def test_app_shares_the_replicas_main_loop_unless_asked(tiny_model_dir):
    from serving.config import ServeConfig
    from serving.deployment import build_application

    models = [{"name": "m", "path": str(tiny_model_dir)}]
    for on, value in ((None, "0"), (False, "0"), (True, "1")):
        extra = {} if on is None else {"user_code_thread": on}
        replica = build_application(ServeConfig(models=models, **extra))
        env = replica._bound_deployment._replica_config.ray_actor_options["runtime_env"]["env_vars"]
        assert env["RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD"] == value
