"""Autoscaling on real Ray Serve: sustained concurrent load adds a replica, idleness removes it again,
observed through `serve.status()`. Short delays keep the test to well under a minute of load."""

from __future__ import annotations

import socket
import threading
import time

import httpx
import pytest

pytestmark = pytest.mark.timeout(300)

APP, DEPLOYMENT = "raylm-autoscale", "OpenAIDeployment"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _running_replicas() -> int:
    from ray import serve

    app = serve.status().applications.get(APP)
    if app is None or DEPLOYMENT not in app.deployments:
        return 0
    return int(app.deployments[DEPLOYMENT].replica_states.get("RUNNING", 0))


def _wait_for(predicate, timeout_s: float) -> bool:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.25)
    return False


@pytest.fixture
def autoscaled(ray_local, tiny_model_dir):
    from ray import serve

    from serving.config import ServeConfig
    from serving.deployment import start

    cfg = ServeConfig(
        models=[{"name": "tiny", "path": str(tiny_model_dir)}],
        app_name=APP,
        port=_free_port(),
        num_cpus=0.5,
        engine={"torch_threads": 1, "max_num_seqs": 4, "warmup": False},
        autoscaling={
            "min_replicas": 1,
            "initial_replicas": 1,
            "max_replicas": 2,
            "target_ongoing_requests": 1,
            "upscale_delay_s": 1,
            "downscale_delay_s": 3,
            "metrics_interval_s": 0.5,
            "look_back_period_s": 1,
        },
    )
    try:
        yield start(cfg)
    finally:
        serve.shutdown()


def _load(url: str, stop: threading.Event, errors: list[str]) -> None:
    body = {"model": "tiny", "prompt": "On Sunday", "max_tokens": 200, "temperature": 0}
    with httpx.Client(timeout=60) as client:
        while not stop.is_set():
            r = client.post(url + "/completions", json=body)
            if r.status_code != 200:
                errors.append(r.text)


def test_replicas_scale_up_under_load_and_back_down(autoscaled):
    assert _running_replicas() == 1
    stop, errors = threading.Event(), []
    workers = [threading.Thread(target=_load, args=(autoscaled, stop, errors)) for _ in range(4)]
    for w in workers:
        w.start()
    t0 = time.monotonic()
    try:
        scaled_up = _wait_for(lambda: _running_replicas() == 2, timeout_s=90)
    finally:
        stop.set()
        for w in workers:
            w.join(timeout=60)
    print(f"scaled up after {time.monotonic() - t0:.1f}s")
    assert scaled_up, "no second replica under 4 concurrent requests with target 1"
    assert not errors, errors[:1]
    t1 = time.monotonic()
    assert _wait_for(lambda: _running_replicas() == 1, timeout_s=90), "did not scale back down"
    print(f"scaled down after {time.monotonic() - t1:.1f}s")
