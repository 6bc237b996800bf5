"""A real two-node Ray cluster on loopback: jobs, `raylm doctor`, the storage probe, placement,
and `raylm serve` with a replica on each node losing the worker node under load.

One module-scoped cluster: a head (`node_head` resource) and a worker node (`node_worker`), each
started with `ray start --block` in its own process group and temp dir, token authentication on
(`RAY_AUTH_MODE=token`, a token file of this cluster's own), all ports chosen here so nothing
collides with the session's in-process `ray_local` or other Ray instances on the machine.
Teardown kills only these process groups and any process whose command line names this
cluster's temp dir; never `ray stop`, which would stop every Ray on the machine.

The worker node runs in a private mount namespace (`unshare -m`) with a tmpfs mounted over
`NODE_LOCAL`: the same path is a different directory on each node, as a node-local disk is on a
real cluster. Everything else on the machine is one filesystem, so the other shared paths here are
shared in fact. The module is skipped where `unshare` is not allowed.

The pytest process never calls `ray.init` for this cluster (it may hold the session's local Ray);
jobs go through `JobSubmissionClient` (HTTP) and `ray job submit` / `raylm doctor` subprocesses,
and Serve is watched and shut down through its REST API on the dashboard.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import httpx
import pytest
import yaml

from tests.conftest import TEST_RAY_ENV, moto_s3_server

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
SEQ = 64


# ---------------------------------------------------------------- the cluster


class LoopbackCluster:
    """Head + one worker node of a token-authenticated Ray cluster on this machine."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.token = secrets.token_hex(32)
        token_file = base / "auth_token"
        token_file.write_text(self.token)
        token_file.chmod(0o600)
        self.node_local = base / "node_local"  # a tmpfs on the worker node, a plain dir here
        self.fake_site = base / "worker_site"  # on the worker node's PYTHONPATH (version test)
        self.node_local.mkdir()
        self.fake_site.mkdir()
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token_file),
                   PATH=f"{BIN}:{env.get('PATH', '')}", TOKENIZERS_PARALLELISM="false",
                   RAY_DEDUP_LOGS="0", RAY_USAGE_STATS_ENABLED="0",
                   # the local S3 server's dummy credentials, as nodes would hold real ones
                   AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                   AWS_DEFAULT_REGION="us-east-1", **TEST_RAY_ENV,
                   # The GCS declares a SIGKILLed node dead after 5 failed checks: one a second
                   # (5 s) instead of Ray's one per 3 s (15 s), which the serve test waits out.
                   # A live but busy raylet keeps Ray's 10 s to answer each check.
                   RAY_health_check_period_ms="1000")  # fmt: skip
        self.env = env  # what a user's shell on the cluster has: ray and raylm on PATH, the token
        self._taken: set[int] = set()
        self.gcs_port, self.dash_port = self._port(), self._port()
        self.procs: dict[str, subprocess.Popen] = {}

    @property
    def gcs(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.dash_port}"

    def _port(self) -> int:
        while True:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            if port not in self._taken:
                self._taken.add(port)
                return port

    def _start(self, name: str, args: list[str], env: dict[str, str], wrap: list[str]) -> None:
        # Every port explicit: two nodes on one machine, and a raylet that knows its agents'
        # ports does not wait on port files (seen here timing out under load).
        ports = ["--dashboard-agent-listen-port", "--dashboard-agent-grpc-port",
                 "--runtime-env-agent-port", "--metrics-export-port", "--object-manager-port",
                 "--node-manager-port"]  # fmt: skip
        cmd = [str(BIN / "ray"), "start", "--block", "--disable-usage-stats", "--num-cpus", "3",
               "--temp-dir", str(self.base / name), *args]  # fmt: skip
        for flag in ports:
            cmd += [flag, str(self._port())]
        log = (self.base / f"{name}.log").open("ab")
        self.procs[name] = subprocess.Popen([*wrap, *cmd], env=env, stdout=log, stderr=log,
                                            start_new_session=True)  # fmt: skip

    def start_head(self) -> None:
        self._start("head", ["--head", "--port", str(self.gcs_port), "--resources",
                             '{"node_head": 1}', "--include-dashboard", "true",
                             "--dashboard-host", "127.0.0.1", "--dashboard-port", str(self.dash_port),
                             "--ray-client-server-port", str(self._port())], self.env, [])  # fmt: skip

    def start_worker(self, name: str = "worker") -> None:
        env = {**self.env, "PYTHONPATH": str(self.fake_site)}
        # A tmpfs over node_local in this node's own mount namespace: same path, other directory.
        wrap = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                'mount -t tmpfs raylm-node-local "$0" && exec "$@"', str(self.node_local)]  # fmt: skip
        self._start(name, ["--address", self.gcs, "--resources", '{"node_worker": 1}'],
                    env, wrap)  # fmt: skip

    def add_worker(self, attempts: int = 3) -> None:
        """Start the worker node; retried because `ray start` gives a joining node a fixed 30 s to
        register (ray/_private/node.py), which a 2-core machine under load sometimes misses."""
        for attempt in range(attempts):
            name = f"worker{attempt}"
            self.start_worker(name)
            try:
                self.wait_nodes(2)
                return
            except RuntimeError:
                if attempt == attempts - 1:
                    raise
            self.kill(name)
            self.wait_nodes(1)  # the GCS has marked the failed node dead

    def kill(self, name: str) -> None:
        """SIGKILL one node: its process group, then stragglers naming its temp dir."""
        proc = self.procs.pop(name)
        with _suppress():
            os.killpg(proc.pid, signal.SIGKILL)
        with _suppress():
            proc.wait(timeout=30)
        for pid in _pids_mentioning(str(self.base / name)):
            with _suppress():
                os.kill(pid, signal.SIGKILL)

    def api(self, path: str, timeout: float = 30) -> dict:
        req = urllib.request.Request(self.dashboard + path,
                                     headers={"Authorization": f"Bearer {self.token}"})  # fmt: skip
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return json.loads(resp.read())

    def alive_nodes(self) -> list[dict]:
        nodes = self.api("/api/v0/nodes?detail=1")["data"]["result"]["result"]
        return [n for n in nodes if n["state"] == "ALIVE"]

    def wait_nodes(self, count: int, timeout_s: float = 240) -> list[dict]:
        deadline = time.monotonic() + timeout_s
        while True:
            for name, proc in self.procs.items():
                if proc.poll() is not None:  # `ray start --block` exits only on failure
                    log = (self.base / f"{name}.log").read_text(errors="replace")[-3000:]
                    raise RuntimeError(f"ray start ({name}) exited {proc.returncode}:\n{log}")
            try:
                nodes = self.alive_nodes()
                if len(nodes) == count:
                    return nodes
            except OSError:
                pass  # dashboard not up yet
            if time.monotonic() > deadline:
                raise TimeoutError(f"{count} alive nodes not reached in {timeout_s} s")
            time.sleep(1)

    def node_id(self, resource: str) -> str:
        return next(n["node_id"] for n in self.alive_nodes() if resource in n["resources_total"])

    def stop(self) -> None:
        for name in list(self.procs):
            self.kill(name)
        # Workers the raylets forked into other groups still name this temp dir in argv.
        for pid in _pids_mentioning(str(self.base)):
            with _suppress():
                os.kill(pid, signal.SIGKILL)


class _suppress:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc) -> bool:
        return exc[0] is not None and issubclass(exc[0], (OSError, subprocess.TimeoutExpired))


def _pids_mentioning(text: str) -> list[int]:
    pids = []
    for proc_dir in Path("/proc").iterdir():
        if proc_dir.name.isdigit() and int(proc_dir.name) != os.getpid():
            try:
                if text.encode() in (proc_dir / "cmdline").read_bytes():
                    pids.append(int(proc_dir.name))
            except OSError:
                continue
    return pids


def _unshare_works() -> bool:
    try:
        res = subprocess.run(["unshare", "--mount", "--propagation", "private", "true"],
                             capture_output=True, timeout=30)  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return False
    return res.returncode == 0


@pytest.fixture(scope="module")
def cluster():
    import tempfile

    if not _unshare_works():
        pytest.skip("needs `unshare --mount` (CAP_SYS_ADMIN) to give the worker node a local disk")
    # Short base path: Ray's socket paths under the temp dir must fit in 107 bytes.
    base = Path(tempfile.mkdtemp(prefix="rlm", dir="/tmp"))
    c = LoopbackCluster(base)
    try:
        c.start_head()
        c.wait_nodes(1)
        c.add_worker()
        yield c
    finally:
        c.stop()
        subprocess.run(["rm", "-rf", str(base)], check=False)


# ---------------------------------------------------------------- helpers


def _run(cmd: list[str], env: dict[str, str], cwd: Path = REPO, timeout: float = 300):
    return subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def _doctor(c: LoopbackCluster, *args: str, env: dict[str, str] | None = None):
    # Not from the repo: Ray puts the driver's cwd first on workers' sys.path, and the repo's
    # raylm.egg-info would then answer for raylm's version on every node.
    return _run([str(BIN / "raylm"), "doctor", "--address", c.gcs, *args], env or c.env, c.base)


def _lines(out: str) -> dict[str, str]:
    """check name -> its line, from doctor's output."""
    rows = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0] in ("PASS", "FAIL", "SKIP"):
            rows[parts[1]] = line
    return rows


def _jobs_client(c: LoopbackCluster):
    from ray.job_submission import JobSubmissionClient

    # The pytest process has no RAY_AUTH_MODE; the header carries this cluster's token.
    return JobSubmissionClient(c.dashboard, headers={"Authorization": f"Bearer {c.token}"})


def _wait_job(client, job_id: str, timeout_s: float = 400) -> tuple[str, str]:
    from ray.job_submission import JobStatus

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = client.get_job_status(job_id)
        if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            return str(status), client.get_job_logs(job_id)
        time.sleep(2)
    client.stop_job(job_id)
    raise TimeoutError(f"job {job_id} still running after {timeout_s} s")


def _write_config(path: Path, tree: dict) -> Path:
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, synth_corpus) -> dict[str, Path]:
    """A tokenizer (built in-process, no Ray) and the configs the jobs run, all absolute paths:
    a job's cwd is its working-dir copy on the head node."""
    from data_pipelines.tokenizer_train import build_tokenizer

    root = tmp_path_factory.mktemp("multinode")
    shards = sorted((synth_corpus / "pretrain").glob("*.jsonl"))  # one shard (~200 docs) is data
    texts = [json.loads(line)["text"] for line in shards[0].read_text().splitlines() if line]
    tok = build_tokenizer(iter(texts), vocab_size=384, min_frequency=2, max_length=SEQ * 4)
    tok.save_pretrained(str(root / "tokenizer"))
    tree = {
        "name": "mn",
        "data": {"inputs": [str(shards[0])], "output": str(root / "data"),
                 "tokenizer": str(root / "tokenizer"), "seq_len": SEQ, "validation_fraction": 0.1,
                 "num_actors": 2, "actor_cpus": 0.5},
        "model": {"preset": "tiny"},
        "train": {"datasets": [str(root / "data")], "storage_path": str(root / "runs"),
                  "global_batch_tokens": SEQ * 4, "micro_batch_size": 2, "max_steps": 4,
                  "warmup_steps": 1, "log_every": 1, "checkpoint_every": 2, "eval_every": 0,
                  "eval_batches": 1},
        "deepspeed": {"zero_stage": 2},
        "scaling": {"num_workers": 2, "placement_strategy": "STRICT_SPREAD"},
    }  # fmt: skip
    return {"root": root, "config": _write_config(root / "mn.yaml", tree)}


# ---------------------------------------------------------------- tests


@pytest.mark.timeout(900)
def test_doctor_passes_then_fails_each_check(cluster, workdir) -> None:
    good = _doctor(cluster, str(workdir["config"]))
    assert good.returncode == 0, good.stdout + good.stderr[-3000:]
    rows = _lines(good.stdout)
    assert set(rows) == {"ray", "versions", "accelerators", "storage", "memory"}, good.stdout
    assert all(r.startswith("PASS") for r in rows.values()), good.stdout
    assert "token accepted" in rows["ray"] and "on all 2 nodes" in rows["versions"]
    assert "each of 2 node(s) wrote a file" in rows["storage"]

    # An s3:// storage path (a real S3 server on 127.0.0.1) is probed from both nodes too.
    with moto_s3_server() as endpoint:
        import boto3

        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                     aws_access_key_id="testing",
                     aws_secret_access_key="testing").create_bucket(Bucket="ckpt")  # fmt: skip
        uri = f"s3://ckpt/runs?endpoint_override={endpoint.removeprefix('http://')}&scheme=http"
        s3 = _doctor(cluster, str(workdir["config"]), "--set", f"train.storage_path={uri}")
    rows = _lines(s3.stdout)
    assert s3.returncode == 0 and "each of 2 node(s) wrote a file" in rows["storage"], s3.stdout

    # Three failures in one run: raylm "installed" at another version on the worker node only,
    # GPUs asked of a CPU cluster, and a storage path that is a different tmpfs on each node.
    meta = cluster.fake_site / "raylm-9.9.9.dist-info"
    meta.mkdir()
    (meta / "METADATA").write_text("Metadata-Version: 2.1\nName: raylm\nVersion: 9.9.9\n")
    try:
        bad = _doctor(cluster, str(workdir["config"]), "--set", "scaling.use_gpu=true",
                      "--set", f"train.storage_path={cluster.node_local}/ckpt")  # fmt: skip
    finally:
        meta.joinpath("METADATA").unlink()
        meta.rmdir()
    assert bad.returncode == 1, bad.stdout + bad.stderr[-3000:]
    rows = _lines(bad.stdout)
    assert rows["ray"].startswith("PASS")
    assert rows["versions"].startswith("FAIL") and "raylm: 0.1.0 on " in rows["versions"]
    assert "9.9.9 on node" in rows["versions"] and "-> fix: " in rows["versions"]
    assert rows["accelerators"].startswith("FAIL") and "needs 2 GPUs" in rows["accelerators"]
    assert rows["storage"].startswith("FAIL") and "does not see the files" in rows["storage"]
    # A 7B model in fp32 without ZeRO (~112 GB of model states) on nodes with far less RAM.
    big = _doctor(cluster, str(workdir["config"]), "--set", "model.hidden_size=4096",
                  "--set", "model.num_layers=32", "--set", "model.num_heads=32",
                  "--set", "model.num_kv_heads=32", "--set", "model.intermediate_size=11008",
                  "--set", "deepspeed.zero_stage=0")  # fmt: skip
    rows = _lines(big.stdout)
    assert big.returncode == 1 and rows["versions"].startswith("PASS"), big.stdout
    assert rows["memory"].startswith("FAIL") and "GiB of RAM" in rows["memory"], big.stdout

    # Nothing listening: refused at once, with the fix.
    down = _run([str(BIN / "raylm"), "doctor", "--address", f"127.0.0.1:{cluster._port()}"],
                cluster.env, timeout=120)  # fmt: skip
    assert down.returncode == 1 and "FAIL  ray" in down.stdout and "no Ray GCS" in down.stdout
    # No token, then a wrong one: authentication, not reachability, is named.
    env = {k: v for k, v in cluster.env.items() if not k.startswith("RAY_AUTH")}
    none = _doctor(cluster, env={**env, "HOME": str(workdir["root"])})
    assert none.returncode == 1 and "requires a token and none was sent" in none.stdout
    wrong = _doctor(cluster, env={**env, "RAY_AUTH_MODE": "token",
                                  "RAY_AUTH_TOKEN": secrets.token_hex(32)})  # fmt: skip
    assert wrong.returncode == 1 and "rejected this process's token" in wrong.stdout
    for res in (good, s3, bad, big, down, none, wrong):
        assert cluster.token not in res.stdout + res.stderr


@pytest.mark.timeout(900)
def test_prepare_and_train_jobs_spread_resume_and_refuse_local_storage(cluster, workdir) -> None:
    from cluster.runtime_env import build_runtime_env

    cfg = workdir["config"]
    client = _jobs_client(cluster)
    # data prepare through the SDK with the runtime env raylm ships (upload checked first).
    job = client.submit_job(entrypoint=f"raylm data prepare {cfg}",
                            runtime_env=build_runtime_env(REPO))  # fmt: skip
    status, logs = _wait_job(client, job)
    assert status == "SUCCEEDED", logs[-4000:]
    assert (workdir["root"] / "data" / "manifest.json").is_file()

    # train through the CLI, as a user submits it: 2 workers, STRICT_SPREAD over the 2 nodes.
    submit = [str(BIN / "ray"), "job", "submit", "--address", cluster.dashboard,
              "--runtime-env", "cluster/runtime_env.yaml", "--working-dir", "."]  # fmt: skip
    first = _run([*submit, "--", "raylm", "train", str(cfg)], cluster.env, timeout=600)
    assert first.returncode == 0, first.stdout[-4000:] + first.stderr[-2000:]
    run_dir = workdir["root"] / "runs" / "mn"
    steps = [json.loads(x)["step"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]

    # Ray's state API: the train workers of that job ran one on each node.
    workers = cluster.api("/api/v0/actors?detail=1&limit=1000&filter_keys=class_name"
                          "&filter_predicates=%3D&filter_values=RayTrainWorker")  # fmt: skip
    nodes = {a["node_id"] for a in workers["data"]["result"]["result"]}
    assert nodes == {cluster.node_id("node_head"), cluster.node_id("node_worker")}, workers

    # Same command, more steps: resumes from the step-4 checkpoint.
    again = _run([*submit, "--", "raylm", "train", str(cfg), "--set", "train.max_steps=6"],
                 cluster.env, timeout=600)  # fmt: skip
    assert again.returncode == 0, again.stdout[-4000:] + again.stderr[-2000:]
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    events = [json.loads(x) for x in (run_dir / "events.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events if e["event"] == "resume"] == [4]

    # A node-local storage path is refused by the probe before any worker starts; run by a
    # driver on the head node (RAY_ADDRESS) rather than a third job: the same preflight, without a
    # job's working-dir upload and supervisor.
    local = _run([str(BIN / "raylm"), "train", str(cfg), "--set", "name=mn-local", "--set",
                  f"train.storage_path={cluster.node_local}/runs"],
                 {**cluster.env, "RAY_ADDRESS": cluster.gcs}, cwd=cluster.base)  # fmt: skip
    out = local.stdout + local.stderr
    assert local.returncode != 0 and "is not shared by the 2 nodes" in out, out[-4000:]
    assert "RayTrainWorker" not in out

    # The token never reaches configs, outputs or logs.
    written = [p for p in workdir["root"].rglob("*") if p.is_file() and p.stat().st_size < 10**7]
    assert any(p.name == "raylm_config.yaml" for p in written)
    for p in written:
        assert cluster.token.encode() not in p.read_bytes(), p
    for text in (logs, first.stdout, again.stdout, out):
        assert cluster.token not in text


# ---------------------------------------------------------------- serving across the nodes

SERVE_APP = "mn-serve"


@dataclasses.dataclass
class _Request:
    start: float  # time.monotonic() when the client sent it
    end: float  # ... when the answer (or the error) came back
    ok: bool
    detail: str


class _SteadyLoad:
    """`threads` clients, each sending a short greedy completion as soon as its last one ended."""

    def __init__(self, url: str, threads: int = 4) -> None:
        self.url = url
        self.records: list[_Request] = []  # list.append is atomic: no lock
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._client, args=(i,), daemon=True)
                         for i in range(threads)]  # fmt: skip

    def _client(self, i: int) -> None:
        body = {"model": "tiny", "prompt": f"On day {i}", "max_tokens": 4, "temperature": 0}
        with httpx.Client(timeout=60) as client:
            while not self._stop.is_set():
                start = time.monotonic()
                try:
                    r = client.post(self.url + "/completions", json=body)
                    ok = r.status_code == 200 and bool(r.json()["choices"][0]["text"])
                    detail = f"{r.status_code} {r.text[:300]}"
                except (httpx.HTTPError, ValueError, KeyError) as exc:
                    ok, detail = False, repr(exc)
                self.records.append(_Request(start, time.monotonic(), ok, detail))

    def __enter__(self) -> _SteadyLoad:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=90)


def _serve_replicas(c: LoopbackCluster) -> list[dict]:
    """The app's replicas (state, node_id, ...) from Serve's REST API on the dashboard."""
    app = (c.api("/api/serve/applications/").get("applications") or {}).get(SERVE_APP) or {}
    return [r for d in (app.get("deployments") or {}).values() for r in d.get("replicas") or []]


def _running_on(c: LoopbackCluster) -> list[str]:
    return sorted(r["node_id"] for r in _serve_replicas(c) if r["state"] == "RUNNING")


def _until(predicate, timeout_s: float, what: str, show=lambda: "") -> float:
    """Poll until predicate() holds (a busy dashboard counts as not yet); seconds it took.
    On timeout the error carries show(): the state the wait was looking at."""
    start = time.monotonic()
    while True:
        with contextlib.suppress(OSError):
            if predicate():
                return time.monotonic() - start
        if time.monotonic() - start > timeout_s:
            raise TimeoutError(f"{what}: not within {timeout_s} s; now {show()}")
        time.sleep(0.5)


def _serve_state(c: LoopbackCluster) -> str:
    try:
        app = c.api("/api/serve/applications/")["applications"].get(SERVE_APP) or {}
    except OSError as exc:
        return repr(exc)
    return json.dumps({name: {"status": d["status"], "message": d["message"][-800:],
                              "replicas": [(r["state"], r.get("node_id")) for r in d["replicas"]]}
                       for name, d in (app.get("deployments") or {}).items()})  # fmt: skip


def _serve_config(c: LoopbackCluster, root: Path, model_dir: Path) -> tuple[Path, int]:
    port = c._port()
    serve = {
        "models": [{"name": "tiny", "path": str(model_dir)}],
        "app_name": SERVE_APP,
        "port": port,
        # One proxy, on the head: clients keep their address when a worker node goes (and two
        # nodes on one machine could not both bind 127.0.0.1:port).
        "proxy_location": "HeadOnly",
        "max_replicas_per_node": 1,  # one replica per node, and no second one on the head
        "num_cpus": 1,
        "engine": {"torch_threads": 1, "max_num_seqs": 4},
        "autoscaling": {"min_replicas": 2, "max_replicas": 2},
        "health_check_period_s": 1,
        "health_check_timeout_s": 10,
        "graceful_shutdown_timeout_s": 1,
    }
    return _write_config(root / "serve.yaml", {"name": "mn-serve", "serve": serve}), port


def _deploy(c: LoopbackCluster, client, cfg: Path, url: str) -> str:
    """`raylm serve` as a job (it blocks, as on a real cluster); returns the job id once both
    replicas are RUNNING and the endpoint answers."""
    from ray.job_submission import JobStatus

    from cluster.runtime_env import build_runtime_env

    job = client.submit_job(entrypoint=f"raylm serve {cfg}", runtime_env=build_runtime_env(REPO))

    def ready() -> bool:
        if client.get_job_status(job) not in (JobStatus.PENDING, JobStatus.RUNNING):
            raise RuntimeError(f"raylm serve job ended:\n{client.get_job_logs(job)[-4000:]}")
        if len(_running_on(c)) < 2:
            return False
        return httpx.get(url + "/models", timeout=10).status_code == 200

    _until(ready, 400, "2 RUNNING replicas and /v1/models answering", lambda: _serve_state(c))
    return job


def _undeploy(c: LoopbackCluster, client, job: str | None) -> None:
    """Stop the job (which shuts Serve down), then make sure through Serve's REST API."""
    if job is not None:
        with contextlib.suppress(Exception):
            client.stop_job(job)
    req = urllib.request.Request(c.dashboard + "/api/serve/applications/", method="DELETE",
                                 headers={"Authorization": f"Bearer {c.token}"})  # fmt: skip
    with contextlib.suppress(OSError):
        urllib.request.urlopen(req, timeout=120).close()
    with contextlib.suppress(TimeoutError):
        _until(lambda: not _serve_replicas(c), 120, "Serve shut down")


def _outage(c: LoopbackCluster, url: str, head: str) -> tuple[list[_Request], float, float]:
    """Steady load over both replicas, SIGKILL the worker node, load on until the head's replica
    alone has answered 20 requests after Serve saw the loss. (records, kill time, seconds until
    Serve's view lost the worker's replica)."""
    with _SteadyLoad(url) as load:
        _until(lambda: sum(r.ok for r in load.records) >= 20, 120, "20 requests before the kill")
        kill_t = time.monotonic()
        c.kill(next(n for n in c.procs if n.startswith("worker")))
        noticed_s = _until(lambda: _running_on(c) == [head], 120, "the lost replica seen",
                           lambda: _serve_state(c))  # fmt: skip
        seen_t = time.monotonic()
        _until(lambda: sum(r.start > seen_t for r in load.records) >= 20, 120,
               "20 requests on the replica left")  # fmt: skip
    return load.records, kill_t, noticed_s


def _check_requests(records: list[_Request], kill_t: float) -> tuple[int, int]:
    """Only requests in flight at the kill may fail; (in flight, failed)."""
    before = [r for r in records if r.end < kill_t]
    in_flight = [r for r in records if r.start < kill_t < r.end]
    after = [r for r in records if r.start > kill_t]
    failed = [r for r in records if not r.ok]
    assert before and all(r.ok for r in before), [r.detail for r in before if not r.ok][:3]
    # Those the lost replica was running may fail; none other.
    assert all(r in in_flight for r in failed), [(r.start - kill_t, r.detail) for r in failed]
    assert len(failed) <= len(in_flight)
    # Every request sent after the kill succeeded: the proxy's router retries a request the dead
    # replica never started, and routes around the replica once Serve has seen the loss.
    assert after and all(r.ok for r in after), [r.detail for r in after if not r.ok][:3]
    return len(in_flight), len(failed)


def _restore(c: LoopbackCluster, head: str) -> tuple[float, float]:
    """Re-add the worker node; (seconds until it joined, then until its replica was RUNNING)."""
    # The GCS marks the node dead only after missed heartbeats, later than Serve's own health
    # check saw the replica go; until then a count of 2 nodes includes the dead one.
    c.wait_nodes(1)
    start = time.monotonic()
    c.add_worker()
    joined_s = time.monotonic() - start
    both = sorted([head, c.node_id("node_worker")])

    def restored() -> bool:
        running = _running_on(c)
        assert len(set(running)) == len(running), f"2 replicas on one node: {running}"
        return running == both

    return joined_s, _until(restored, 300, "2 RUNNING replicas after the node returned",
                            lambda: _serve_state(c))  # fmt: skip


@pytest.mark.timeout(900)
def test_serve_across_nodes_survives_losing_the_worker_node(cluster, workdir, tiny_model_dir):
    cfg, port = _serve_config(cluster, workdir["root"], tiny_model_dir)
    url = f"http://127.0.0.1:{port}/v1"
    client, job, t0 = _jobs_client(cluster), None, time.monotonic()
    try:
        job = _deploy(cluster, client, cfg, url)
        deployed_s = time.monotonic() - t0
        head, worker_id = cluster.node_id("node_head"), cluster.node_id("node_worker")
        assert _running_on(cluster) == sorted([head, worker_id])  # one replica on each node
        details = cluster.api("/api/serve/applications/")
        assert details["proxy_location"] == "HeadOnly" and set(details["proxies"]) == {head}

        records, kill_t, noticed_s = _outage(cluster, url, head)
        # One per node: the replacement waits for a node (none yet) instead of doubling up on the
        # head, which keeps its one replica.
        replicas = _serve_replicas(cluster)
        assert _running_on(cluster) == [head], replicas
        assert [r.get("node_id") for r in replicas].count(head) == 1, replicas
        assert any(r["state"] == "STARTING" and not r.get("node_id") for r in replicas), replicas
        in_flight, failed = _check_requests(records, kill_t)

        joined_s, restored_s = _restore(cluster, head)
        body = {"model": "tiny", "prompt": "Back again", "max_tokens": 4, "temperature": 0}
        codes = [httpx.post(url + "/completions", json=body, timeout=60).status_code
                 for _ in range(8)]  # fmt: skip
        assert codes == [200] * 8
        assert client.get_job_status(job) == "RUNNING"  # `raylm serve` on the head lived on

        # `ray job stop` takes the endpoint down with the job: `ray.init` made SIGTERM a SystemExit
        # in the driver, so `raylm serve` shuts Serve down before Ray's SIGKILL 3 s later.
        client.stop_job(job)
        job = None

        seen: list[str] = []

        def deleted() -> bool:  # no proxy (refused) or no route (404): not a timeout or a 5xx
            try:
                seen.append(str(httpx.get(url + "/models", timeout=10).status_code))
            except httpx.ConnectError as exc:
                seen.append(repr(exc))
                return True
            except httpx.HTTPError as exc:
                seen.append(repr(exc))
            return seen[-1] == "404"

        deleted_s = _until(deleted, 60, "the endpoint gone after ray job stop",
                           lambda: f"{_serve_state(cluster)}; /v1/models: {seen[-3:]}")  # fmt: skip

        # The only app on Serve: `raylm serve` shut Serve down with it (no app, controller or proxy).
        def serve_gone() -> bool:
            details = cluster.api("/api/serve/applications/")
            return not any(details.get(k) for k in ("applications", "controller_info", "proxies"))

        _until(serve_gone, 30, "Serve shut down after ray job stop", lambda: _serve_state(cluster))
        print(
            f"\nserve across nodes: deployed in {deployed_s:.0f} s; {len(records)} requests, "
            f"{in_flight} in flight at the kill, {failed} failed; Serve saw the loss after "
            f"{noticed_s:.1f} s; node back in {joined_s:.0f} s, its replica RUNNING "
            f"{restored_s:.0f} s later; endpoint gone {deleted_s:.0f} s after ray job stop "
            f"(/v1/models: {seen[-1]})"
        )
    finally:
        _undeploy(cluster, client, job)
        if not any(n.startswith("worker") for n in cluster.procs):
            with contextlib.suppress(Exception):  # leave the module's cluster as it was found
                cluster.add_worker()
