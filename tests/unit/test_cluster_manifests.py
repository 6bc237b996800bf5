"""Cluster definitions and cluster docs refer only to things that exist.

Ray cluster launcher YAMLs (cluster/launcher/) are checked against the cluster-config JSON schema that
ships inside the installed `ray` package and Ray's own config preparation; KubeRay manifests
(cluster/kuberay/) for the fields KubeRay needs; every `raylm` command they, cluster/Dockerfile, the
READMEs and docs/ run must parse with the real `raylm` parser, every repo file they name must exist,
and every relative link of the docs must reach a file (and heading). Each checker returns a list of
problems, so the tests below also show it catching a broken copy.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib
import io
import json
import re
import shlex
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

from cluster.cli import build_parser

REPO = Path(__file__).resolve().parents[2]
LAUNCHERS = sorted((REPO / "cluster" / "launcher").glob("*.yaml"))
KUBERAY = REPO / "cluster" / "kuberay"
DOCKERFILE = REPO / "cluster" / "Dockerfile"
# Every Markdown file a reader follows: the READMEs and docs/ (per-command detail, config reference).
DOCS = [REPO / "README.md", REPO / "cluster" / "README.md", *sorted((REPO / "docs").glob("*.md"))]
SHARED_MOUNT = "/mnt/raylm"

# Programs whose lines in a YAML comment are commands (checked like shell), not prose.
_PROGRAMS = {"ray", "raylm", "kubectl", "docker", "helm", "serve", "curl", "export", "cd"}
_SEPARATORS = {"&&", "||", ";", "|", "&", "(", ")"}
_REPO_PATH = re.compile(
    r"^(cluster|configs|serving|training|data_pipelines|tests|docs|bench)/[\w./-]*\w$"
)
_SECRET_NAME = re.compile(r"TOKEN|KEY|SECRET|PASSWORD", re.IGNORECASE)


# ---------------------------------------------------------------- shell commands and `raylm` argv


def shell_commands(text: str) -> list[list[str]]:
    """Simple commands of shell text: one list of words per command, split at && ; | and lines."""
    commands: list[list[str]] = []
    for line in text.replace("\\\n", " ").splitlines():
        lex = shlex.shlex(line, posix=True, punctuation_chars=True)
        lex.whitespace_split = True
        try:
            words = list(lex)
        except ValueError:  # an unbalanced quote in prose: plain words are enough here
            words = line.split()
        current: list[str] = []
        skip_next = False
        for i, word in enumerate(words + [";"]):
            if skip_next:  # the target of a redirection
                skip_next = False
            elif word in _SEPARATORS:
                if current:
                    commands.append(current)
                current = []
            elif word[0] in "<>":
                skip_next = True
            elif not (word.isdigit() and i + 1 < len(words) and words[i + 1][0] in "<>"):
                current.append(word)
    return commands


def raylm_argv(command: list[str]) -> list[str] | None:
    """The arguments of `raylm` when a simple command runs it (directly, after env assignments, or
    after `--` as in `ray job submit ... -- raylm ...` and `kubectl exec ... -- raylm ...`)."""
    for i, word in enumerate(command):
        if word != "raylm":
            continue
        before = command[:i]
        if all(re.match(r"^\w+=", w) for w in before) or (before and before[-1] == "--"):
            return command[i + 1 :]
    return None


def _subcommands(parser: argparse.ArgumentParser, prefix: str = "") -> set[str]:
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        return {prefix.strip()}
    paths: set[str] = set()
    for name, child in subs[0].choices.items():
        paths |= _subcommands(child, f"{prefix} {name}")
    return paths


SUBCOMMANDS = _subcommands(build_parser())


def subcommand_problems(argv: list[str]) -> list[str]:
    """`raylm X` or `raylm X Y` must name a real (sub)command of the parser."""
    for n in (2, 1):
        if " ".join(argv[:n]) in SUBCOMMANDS:
            return []
    return [f"raylm {' '.join(argv)}: no such subcommand (have: {', '.join(sorted(SUBCOMMANDS))})"]


def raylm_problems(argv: list[str]) -> list[str]:
    """The whole argv parses with the real parser and its CONFIG is a file in the repo."""
    shown = "raylm " + " ".join(argv)
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            args = build_parser().parse_args(argv)
    except SystemExit as exc:
        return [f"{shown}: {err.getvalue().strip().splitlines()[-1]}"] if exc.code else []
    config = getattr(args, "config", None)
    if config is not None and not (REPO / config).is_file():
        return [f"{shown}: config {config} is not a file in the repository"]
    return []


def command_problems(text: str, workdir: str | None = None) -> list[str]:
    """Every `raylm` command in shell text parses and names existing configs; every repo path
    (cluster/..., configs/...) exists; `cd` only into the image's copy of the repo (``workdir``)."""
    problems: list[str] = []
    for command in shell_commands(text):
        if command[0] == "cd" and command[1:] != [workdir]:
            problems.append(f"cd {' '.join(command[1:])}: only the image's repo copy {workdir}")
        argv = raylm_argv(command)
        if argv is not None:
            problems += raylm_problems(argv)
        for word in command:
            path = word.split("=", 1)[-1]  # --out=DIR, KEY=cluster/x.yaml
            if _REPO_PATH.match(path) and not (REPO / path).exists():
                problems.append(f"{' '.join(command)}: {path} does not exist in the repository")
    return problems


def comment_commands(text: str) -> str:
    """The command lines among a file's `#` comments: indented (`#   ray up ...`) and starting
    with a known program; prose lines are left alone."""
    lines = []
    for line in text.splitlines():
        match = re.match(r"^\s*#\s{2,}(\S+)(.*)$", line)
        if match and match.group(1) in _PROGRAMS:
            lines.append((match.group(1) + match.group(2)).split("  #", 1)[0])
    return "\n".join(lines)


def ray_pin() -> str:
    """The `ray==` version every cluster image must run (constraints.txt)."""
    text = (REPO / "constraints.txt").read_text()
    return re.search(r"^ray==(\S+)$", text, re.MULTILINE).group(1)


def install_sources() -> set[str]:
    """What `pip install .` of this repo reads: pyproject, its readme, every package directory
    (read with regexes: tomllib is Python 3.11+, the project supports 3.10)."""
    text = (REPO / "pyproject.toml").read_text()
    readme = re.search(r'^readme = "([^"]+)"', text, re.MULTILINE).group(1)
    include = re.search(r"^include = \[([^\]]*)\]", text, re.MULTILINE).group(1)
    return {"pyproject.toml", readme} | {p.strip(' "*') for p in include.split(",")}


def image_ray_problems(image: str, where: str) -> list[str]:
    match = re.match(r"^rayproject/ray:(\d+\.\d+\.\d+)-", image)
    if not match or match.group(1) != ray_pin():
        return [f"{where}: image {image} must be rayproject/ray:{ray_pin()}-... (constraints.txt)"]
    return []


# ---------------------------------------------------------------- Ray cluster launcher YAMLs

_LAUNCHER_COMMANDS = ("initialization_commands", "setup_commands", "head_setup_commands",
                      "worker_setup_commands", "head_start_ray_commands", "worker_start_ray_commands")  # fmt: skip
_PROVIDER_KEYS = {"aws": ["region"], "gcp": ["region", "availability_zone", "project_id"]}
_NODE_KEYS = {"aws": ["InstanceType", "ImageId"], "gcp": ["machineType", "disks"]}


def launcher_schema_problems(cfg: dict) -> list[str]:
    """The JSON schema inside the installed `ray`, then Ray's own preparation and validation
    (defaults merged, head type among the node types, min_workers within max_workers), as in
    `ray up`."""
    import ray.autoscaler
    from ray.autoscaler._private.util import prepare_config, validate_config

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    try:
        jsonschema.validate(cfg, schema)
        validate_config(prepare_config(copy.deepcopy(cfg)))
    except (jsonschema.ValidationError, ValueError, KeyError, AssertionError) as exc:
        return [f"ray cluster config: {str(exc).splitlines()[0]}"]
    return []


def launcher_provider_problems(cfg: dict) -> list[str]:
    """What each cloud needs that Ray's schema leaves optional."""
    kind = cfg["provider"]["type"]
    problems = [
        f"provider.{k}: missing" for k in _PROVIDER_KEYS[kind] if not cfg["provider"].get(k)
    ]
    for name, node in cfg["available_node_types"].items():
        nc = node["node_config"]
        problems += [f"{name}.node_config.{k}: missing" for k in _NODE_KEYS[kind] if k not in nc]
        maintenance = nc.get("scheduling", {}).get("onHostMaintenance")
        if kind == "gcp" and node["resources"].get("GPU", 0) > 0 and maintenance != "TERMINATE":
            problems.append(f"{name}: GCP GPU VMs need scheduling.onHostMaintenance TERMINATE")
    return problems


def launcher_shape_problems(cfg: dict) -> list[str]:
    """A CPU head that schedules nothing, GPU worker types, autoscaling bounds, idle timeout."""
    types, head_type, problems = cfg["available_node_types"], cfg.get("head_node_type"), []
    if types.get(head_type, {}).get("resources") != {"CPU": 0, "GPU": 0}:
        problems.append("head node type: resources must be {CPU: 0, GPU: 0} (nothing scheduled)")
    workers = {n: t for n, t in types.items() if n != head_type}
    if not any(t["resources"].get("GPU", 0) and t.get("max_workers", 0) for t in workers.values()):
        problems.append("no GPU worker type with max_workers > 0")
    for name, t in workers.items():
        if not 0 <= t.get("min_workers", 0) <= t.get("max_workers", -1):
            problems.append(f"{name}: needs 0 <= min_workers <= max_workers")
    if not cfg.get("idle_timeout_minutes", 0) > 0:
        problems.append("idle_timeout_minutes: set it so idle GPU nodes go away")
    # A node type's own initialization_commands replace the global ones (the shared-storage mount).
    shared = cfg.get("initialization_commands", [])
    for name, t in types.items():
        dropped = [c for c in shared if c not in t.get("initialization_commands", shared)]
        if dropped:
            problems.append(f"{name}.initialization_commands: drops global {dropped[0][:60]!r}")
    return problems


def launcher_file_problems(cfg: dict) -> list[str]:
    """file_mounts come from repo files (or ~/ files of the user); commands use only mounted
    paths; `pip install` of the mounted copy has every source it needs and uses constraints.txt."""
    mounts, problems = cfg.get("file_mounts", {}), []
    for remote, local in mounts.items():
        if not local.startswith("~") and not (REPO / local).exists():
            problems.append(f"file_mounts {remote}: {local} does not exist in the repository")
    text = "\n".join(c for key in _LAUNCHER_COMMANDS for c in cfg.get(key, []))
    for command in shell_commands(text):
        for word in (w for w in command if w.startswith("~/") and w not in mounts):
            inside = {
                r[len(word.rstrip("/")) + 1 :]
                for r in mounts
                if r.startswith(word.rstrip("/") + "/")
            }
            if not inside:
                problems.append(f"{' '.join(command)}: {word} is not provided by file_mounts")
            elif command[:2] == ["pip", "install"]:
                problems += [
                    f"pip install {word}: {s} not mounted"
                    for s in sorted(install_sources() - inside)
                ]
    if not any("-c ~/raylm/constraints.txt" in c for c in cfg.get("setup_commands", [])):
        problems.append("setup_commands: install raylm with -c ~/raylm/constraints.txt")
    return problems + command_problems(text)


def launcher_problems(cfg: dict, text: str = "") -> list[str]:
    """Everything wrong with a launcher config (``text``: its file, for the header commands)."""
    problems = launcher_schema_problems(cfg)
    if problems:  # the other checks assume a config of the right shape
        return problems
    image = cfg.get("docker", {}).get("image", "")
    return (
        launcher_provider_problems(cfg)
        + launcher_shape_problems(cfg)
        + launcher_file_problems(cfg)
        + image_ray_problems(image, "docker.image")
        + command_problems(comment_commands(text))
    )


@pytest.mark.parametrize("path", LAUNCHERS, ids=lambda p: p.name)
def test_launcher_config_is_valid_and_refers_to_real_files(path):
    text = path.read_text()
    assert launcher_problems(yaml.safe_load(text), text) == []


def test_launchers_cover_aws_and_gcp():
    assert {yaml.safe_load(p.read_text())["provider"]["type"] for p in LAUNCHERS} >= {"aws", "gcp"}


def _broken(cfg: dict, edit) -> list[str]:
    bad = copy.deepcopy(cfg)
    edit(bad)
    return launcher_problems(bad)


def test_launcher_checks_catch_broken_copies():
    text = (REPO / "cluster" / "launcher" / "gcp.yaml").read_text()
    cfg = yaml.safe_load(text)
    types = "available_node_types"
    problems = _broken(cfg, lambda c: c.update(head_node_type="no_such_type"))
    assert problems == [
        "ray cluster config: `head_node_type` must be one of `available_node_types`."
    ]
    problems = _broken(cfg, lambda c: c[types]["gpu_train"].update(max_workres=2))  # a typo
    assert len(problems) == 1 and "'max_workres' was unexpected" in problems[0]
    problems = _broken(cfg, lambda c: c[types]["gpu_serve"].update(initialization_commands=["ls"]))
    assert any(p.startswith("gpu_serve.initialization_commands: drops global") for p in problems)
    problems = _broken(cfg, lambda c: c.update(setup_commands=["pip install -r ~/raylm/reqs.txt"]))
    assert (
        "pip install -r ~/raylm/reqs.txt: ~/raylm/reqs.txt is not provided by file_mounts"
        in problems
    )
    assert "setup_commands: install raylm with -c ~/raylm/constraints.txt" in problems
    problems = _broken(cfg, lambda c: c["file_mounts"].pop("~/raylm/serving"))
    assert problems == ["pip install ~/raylm: serving not mounted"]
    problems = _broken(cfg, lambda c: c[types]["head"].update(resources={"CPU": 8}))
    assert problems == ["head node type: resources must be {CPU: 0, GPU: 0} (nothing scheduled)"]
    problems = _broken(cfg, lambda c: c["docker"].update(image="rayproject/ray:2.9.0-py311-gpu"))
    assert len(problems) == 1 and "constraints.txt" in problems[0]
    problems = _broken(cfg, lambda c: c[types]["gpu_serve"]["node_config"].pop("scheduling"))
    assert problems == ["gpu_serve: GCP GPU VMs need scheduling.onHostMaintenance TERMINATE"]
    broken = text.replace("raylm train configs/cluster_gpu.yaml", "raylm train configs/nope.yaml")
    assert any(
        "config configs/nope.yaml is not a file" in p for p in launcher_problems(cfg, broken)
    )


# ---------------------------------------------------------------- cluster/Dockerfile


def dockerfile() -> dict:
    """FROM image, WORKDIR and COPY sources of cluster/Dockerfile."""
    out: dict = {"copies": []}
    for line in DOCKERFILE.read_text().splitlines():
        words = line.split()
        if words and words[0] == "FROM":
            out["image"] = words[1]
        elif words and words[0] == "WORKDIR":
            out["workdir"] = words[1]
        elif words and words[0] == "COPY":
            out["copies"] += [w for w in words[1:-1] if not w.startswith("--")]
    return out


def test_dockerfile_installs_raylm_from_files_that_exist_on_the_pinned_ray():
    image = dockerfile()
    assert image_ray_problems(image["image"], "cluster/Dockerfile FROM") == []
    assert [c for c in image["copies"] if not (REPO / c).exists()] == []
    assert install_sources() - set(image["copies"]) == set(), "pip install . needs these"
    assert "configs" in image["copies"], "RayJob entrypoints run configs/ from the image"
    assert "-c constraints.txt" in DOCKERFILE.read_text()
    assert command_problems(comment_commands(DOCKERFILE.read_text())) == []


# ---------------------------------------------------------------- KubeRay manifests

CLUSTER_SPEC = {"RayCluster": ("spec",), "RayJob": ("spec", "rayClusterSpec"),
                "RayService": ("spec", "rayClusterConfig")}  # fmt: skip


def kuberay_docs(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((KUBERAY / name).read_text()) if d]


def _pods(spec: dict) -> list[tuple[str, dict]]:
    head = [("headGroupSpec", spec.get("headGroupSpec", {}).get("template", {}).get("spec", {}))]
    groups = spec.get("workerGroupSpecs") or []
    return head + [
        (f"workerGroupSpecs.{g.get('groupName')}", g.get("template", {}).get("spec", {}))
        for g in groups
    ]


def pod_problems(where: str, pod: dict, image: str) -> list[str]:
    """Containers with an image and resources, volumes that exist, the shared PVC, no literal
    secrets in env."""
    problems: list[str] = []
    containers = pod.get("containers") or []
    if not containers:
        return [f"{where}: no containers"]
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    for c in containers + pod.get("initContainers", []):
        if c.get("image") != image:
            problems.append(f"{where}.{c.get('name')}: image {c.get('image')} (others use {image})")
        for m in c.get("volumeMounts", []):
            if m["name"] not in volumes:
                problems.append(f"{where}.{c.get('name')}: volumeMount {m['name']} has no volume")
        for env in c.get("env", []):
            if _SECRET_NAME.search(env["name"]) and "value" in env:
                problems.append(
                    f"{where}: env {env['name']} is a literal; use valueFrom.secretKeyRef"
                )
    for c in containers:
        res = c.get("resources", {})
        if not (res.get("limits") and res.get("requests")):
            problems.append(f"{where}.{c.get('name')}: set resources.limits and requests")
        if SHARED_MOUNT not in {m["mountPath"] for m in c.get("volumeMounts", [])}:
            problems.append(f"{where}.{c.get('name')}: mount the shared volume at {SHARED_MOUNT}")
    claims = {v.get("persistentVolumeClaim", {}).get("claimName") for v in volumes.values()}
    if "raylm-shared" not in claims:
        problems.append(f"{where}: no volume from the PVC raylm-shared (storage.yaml)")
    return problems


def cluster_spec_problems(kind: str, spec: dict, image: str) -> list[str]:
    """Head that schedules nothing, GPU workers, Ray pinned like constraints.txt, token auth."""
    problems: list[str] = []
    if spec.get("rayVersion") != ray_pin():
        problems.append(
            f"rayVersion {spec.get('rayVersion')} != ray=={ray_pin()} (constraints.txt)"
        )
    auth = spec.get("authOptions") or {}
    if auth.get("mode") != "token" or not auth.get("secretName"):
        problems.append("authOptions: mode token with secretName (a Secret holding auth_token)")
    if spec.get("headGroupSpec", {}).get("rayStartParams", {}).get("num-cpus") != "0":
        problems.append(
            'headGroupSpec.rayStartParams: num-cpus "0" (nothing scheduled on the head)'
        )
    groups = spec.get("workerGroupSpecs") or []
    for g in groups:
        if not g.get("groupName") or not isinstance(g.get("rayStartParams"), dict):
            problems.append(
                f"workerGroupSpecs: {g.get('groupName')} needs groupName and rayStartParams"
            )
        lo, hi = g.get("minReplicas"), g.get("maxReplicas")
        if not (isinstance(lo, int) and isinstance(hi, int) and lo <= g.get("replicas", lo) <= hi):
            problems.append(
                f"workerGroupSpecs.{g.get('groupName')}: minReplicas <= replicas <= maxReplicas"
            )
    gpus = [c for _, pod in _pods(spec)[1:] for c in pod.get("containers", [])
            if "nvidia.com/gpu" in c.get("resources", {}).get("limits", {})]  # fmt: skip
    if not gpus:
        problems.append("workerGroupSpecs: no GPU worker group (limits nvidia.com/gpu)")
    if kind != "RayJob" and not (
        spec.get("enableInTreeAutoscaling") and spec.get("autoscalerOptions")
    ):
        problems.append("enableInTreeAutoscaling: true with autoscalerOptions")
    for where, pod in _pods(spec):
        problems += pod_problems(where, pod, image)
    return problems


def rayjob_problems(doc: dict, workdir: str) -> list[str]:
    spec, problems = doc["spec"], []
    if spec.get("shutdownAfterJobFinishes") is not True:
        problems.append("shutdownAfterJobFinishes: true (delete the cluster when the job ends)")
    if not (
        isinstance(spec.get("ttlSecondsAfterFinished"), int) and spec["ttlSecondsAfterFinished"] > 0
    ):
        problems.append("ttlSecondsAfterFinished: a positive number of seconds")
    if spec.get("runtimeEnvYAML") and not isinstance(yaml.safe_load(spec["runtimeEnvYAML"]), dict):
        problems.append("runtimeEnvYAML: not a YAML mapping")
    entrypoint = spec.get("entrypoint", "")
    if not any(raylm_argv(c)[:1] == ["train"] for c in shell_commands(entrypoint) if raylm_argv(c)):
        problems.append("entrypoint: runs no `raylm train`")
    return problems + command_problems(entrypoint, workdir)


def serve_app_problems(app: dict) -> list[str]:
    """import_path resolves in this repo; raylm's builder accepts the args and its serve section."""
    where = f"serveConfigV2 application {app.get('name')}"
    module, _, attr = str(app.get("import_path", "")).partition(":")
    try:
        builder = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError, ValueError) as exc:
        return [f"{where}: import_path {app.get('import_path')}: {exc}"]
    if not callable(builder):
        return [f"{where}: {app['import_path']} is not callable"]
    if app["import_path"] != "serving.deployment:build_app":
        return []
    from serving.deployment import AppArgs, load_serve_config

    try:
        args = AppArgs.model_validate(app.get("args") or {})
        if args.config is not None and not (REPO / args.config).is_file():
            return [f"{where}: args.config {args.config} is not a file in the repository"]
        load_serve_config(args.config, args.overrides, args.serve)
    except ValueError as exc:  # pydantic's ValidationError is a ValueError
        return [f"{where}: args: {exc}"]
    return []


def rayservice_problems(doc: dict) -> list[str]:
    try:
        serve_config = yaml.safe_load(doc["spec"].get("serveConfigV2", ""))
    except yaml.YAMLError as exc:
        return [f"serveConfigV2: invalid YAML: {exc}"]
    apps = (serve_config or {}).get("applications") or []
    if not apps:
        return ["serveConfigV2: no applications"]
    problems = [p for app in apps for p in serve_app_problems(app)]
    spec = doc["spec"]["rayClusterConfig"]
    env = {e["name"] for _, pod in _pods(spec)[1:] for c in pod.get("containers", []) for e in c.get("env", [])
           if e.get("valueFrom", {}).get("secretKeyRef")}  # fmt: skip
    for app in apps:
        key_env = ((app.get("args") or {}).get("serve") or {}).get("api_keys_env")
        if key_env and key_env not in env:
            problems.append(f"serve.api_keys_env {key_env}: no worker env var from a Secret")
    return problems


def kuberay_problems(doc: dict, image: str, workdir: str) -> list[str]:
    kind = doc.get("kind")
    if doc.get("apiVersion") != "ray.io/v1" or kind not in CLUSTER_SPEC:
        return [f"{kind}: apiVersion must be ray.io/v1 and kind one of {sorted(CLUSTER_SPEC)}"]
    if not doc.get("metadata", {}).get("name"):
        return [f"{kind}: metadata.name missing"]
    spec = doc
    for key in CLUSTER_SPEC[kind]:
        spec = spec.get(key) or {}
    problems = cluster_spec_problems(kind, spec, image)
    if kind == "RayJob":
        problems += rayjob_problems(doc, workdir)
    if kind == "RayService":
        problems += rayservice_problems(doc)
    return problems


MANIFESTS = {
    "raycluster.yaml": "RayCluster",
    "rayjob.yaml": "RayJob",
    "rayservice.yaml": "RayService",
}
IMAGE = "registry.example.com/raylm:0.1.0"  # the placeholder cluster/README.md tells you to replace


@pytest.mark.parametrize("name", sorted(MANIFESTS))
def test_kuberay_manifest_has_required_fields_and_real_references(name):
    docs = kuberay_docs(name)
    assert [d["kind"] for d in docs] == [MANIFESTS[name]]
    text = (KUBERAY / name).read_text()
    assert kuberay_problems(docs[0], IMAGE, dockerfile()["workdir"]) == []
    assert command_problems(comment_commands(text), dockerfile()["workdir"]) == []


def test_shared_volume_claim_is_read_write_many():
    (pvc,) = kuberay_docs("storage.yaml")
    assert (pvc["kind"], pvc["metadata"]["name"]) == ("PersistentVolumeClaim", "raylm-shared")
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"], "every pod writes to it"


def test_kuberay_checks_catch_broken_copies():
    workdir = dockerfile()["workdir"]
    (job,) = kuberay_docs("rayjob.yaml")
    bad = copy.deepcopy(job)
    bad["spec"]["entrypoint"] = job["spec"]["entrypoint"].replace(
        "configs/cluster_gpu.yaml", "configs/nope.yaml"
    )
    assert "config configs/nope.yaml is not a file" in " ".join(
        kuberay_problems(bad, IMAGE, workdir)
    )
    bad["spec"]["entrypoint"] = "cd /home/ray/raylm && raylm trian configs/cluster_gpu.yaml"
    problems = " ".join(kuberay_problems(bad, IMAGE, workdir))
    assert "invalid choice: 'trian'" in problems and "runs no `raylm train`" in problems
    bad = copy.deepcopy(job)
    bad["spec"]["shutdownAfterJobFinishes"] = False
    bad["spec"]["rayClusterSpec"]["rayVersion"] = "2.9.0"
    del bad["spec"]["rayClusterSpec"]["authOptions"]
    problems = " ".join(kuberay_problems(bad, IMAGE, workdir))
    assert all(k in problems for k in ("shutdownAfterJobFinishes", "rayVersion", "authOptions"))

    (svc,) = kuberay_docs("rayservice.yaml")
    for old, new, expected in [
        ("serving.deployment:build_app", "serving.deployment:no_such_builder", "no_such_builder"),
        ("num_gpus: 1", "num_gpu: 1", "serve.num_gpu"),
        ("api_keys_env: RAYLM_API_KEYS", "api_keys_env: OTHER_KEYS", "OTHER_KEYS"),
        ("applications:", "applications: [", "invalid YAML"),
    ]:
        bad = copy.deepcopy(svc)
        bad["spec"]["serveConfigV2"] = svc["spec"]["serveConfigV2"].replace(old, new)
        assert expected in " ".join(kuberay_problems(bad, IMAGE, workdir)), old
    bad = copy.deepcopy(svc)
    worker = bad["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["spec"]
    worker["containers"][0]["env"] = [{"name": "RAYLM_API_KEYS", "value": "sk-in-the-manifest"}]
    assert "is a literal" in " ".join(kuberay_problems(bad, IMAGE, workdir))


# ---------------------------------------------------------------- docs


def code_blocks(markdown: str) -> list[str]:
    """Shell code blocks of a Markdown file (fenced, no language or a shell one)."""
    blocks = re.findall(r"^```([\w-]*)\n(.*?)^```", markdown, re.MULTILINE | re.DOTALL)
    return [body for lang, body in blocks if lang in ("", "sh", "bash", "shell", "console")]


def doc_subcommand_problems(markdown: str) -> list[str]:
    return [
        p
        for block in code_blocks(markdown)
        for command in shell_commands(block)
        if (argv := raylm_argv(command)) is not None
        for p in subcommand_problems(argv)
    ]


def _slug(heading: str) -> str:
    """GitHub's anchor for a Markdown heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def link_problems(doc: Path) -> list[str]:
    """Relative links `[text](path#anchor)` of a Markdown file whose file or heading is missing."""
    problems = []
    for target in re.findall(r"\]\(([^)\s]+)\)", doc.read_text()):
        if re.match(r"^[a-z]+:", target):  # http(s):, mailto:
            continue
        path, _, anchor = target.partition("#")
        dest = (doc.parent / path).resolve() if path else doc
        if not dest.exists():
            problems.append(f"{doc.relative_to(REPO)}: link {target}: no such file")
        elif anchor and dest.suffix == ".md":
            headings = re.findall(r"^#+ (.+)$", dest.read_text(), re.MULTILINE)
            if anchor not in {_slug(h) for h in headings}:
                problems.append(f"{doc.relative_to(REPO)}: link {target}: no such heading")
    return problems


def test_docs_cover_the_docs_folder_and_readme_links_each():
    names = {str(p.relative_to(REPO)) for p in DOCS}
    assert {"docs/config.md", "docs/guarantees.md", "docs/train.md", "docs/serve.md"} <= names
    readme = (REPO / "README.md").read_text()
    for path in DOCS[2:]:
        assert f"({path.relative_to(REPO)}" in readme, f"README.md does not link {path.name}"


@pytest.mark.parametrize("path", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_docs_run_only_real_raylm_subcommands(path):
    assert doc_subcommand_problems(path.read_text()) == []


@pytest.mark.parametrize("path", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_doc_commands_parse_and_name_existing_files(path):
    text = path.read_text()
    assert [p for block in code_blocks(text) for p in command_problems(block)] == []


@pytest.mark.parametrize("path", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_doc_links_reach_existing_files_and_headings(path):
    assert link_problems(path) == []


def test_cluster_readme_shows_every_stage():
    text = (REPO / "cluster" / "README.md").read_text()
    commands = [
        " ".join(argv[:2])
        for b in code_blocks(text)
        for c in shell_commands(b)
        if (argv := raylm_argv(c))
    ]
    for stage in ("data prepare", "train configs/cluster_gpu.yaml", "doctor", "export", "serve"):
        assert any(c.startswith(stage) for c in commands), (
            f"cluster/README.md shows no `raylm {stage}`"
        )


def test_cluster_readme_is_linked_from_the_main_readme():
    assert "(cluster/README.md)" in (REPO / "README.md").read_text()


def test_doc_checks_catch_drift():
    drifted = (
        "Prose `raylm trian` is not checked.\n```\nray job submit -- raylm trian x.yaml\n```\n"
    )
    (problem,) = doc_subcommand_problems(drifted)
    assert problem.startswith("raylm trian x.yaml: no such subcommand (have: data prepare, ")
    assert command_problems("kubectl apply -f cluster/kuberay/nope.yaml") == [
        "kubectl apply -f cluster/kuberay/nope.yaml: cluster/kuberay/nope.yaml does not exist"
        " in the repository"
    ]
    (problem,) = command_problems("raylm export runs/x --out y --dtype fp8")
    assert "argument --dtype: invalid choice: 'fp8'" in problem
    assert command_problems("raylm data prepare configs/quickstart.yaml") == []
    assert (
        _slug("SIGTERM (spot preemption, `ray job stop`)") == "sigterm-spot-preemption-ray-job-stop"
    )


def test_link_check_catches_broken_links(tmp_path, monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text("# A\n## `raylm train`\n")
    doc = tmp_path / "README.md"
    doc.write_text(
        "[ok](docs/a.md#raylm-train) [web](https://x.org/y) [self](#top)\n# Top\n"
        "[gone](docs/b.md) [heading](docs/a.md#raylm-serve)\n"
    )
    assert link_problems(doc) == [
        "README.md: link docs/b.md: no such file",
        "README.md: link docs/a.md#raylm-serve: no such heading",
    ]
