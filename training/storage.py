"""Run dirs on S3 (``train.storage_path: s3://bucket/prefix``), for nodes that share nothing else.

Ray Train stores the checkpoints itself (``RunConfig(storage_path="bucket/prefix",
storage_filesystem=S3FileSystem(...))``). The files raylm writes into a run dir with plain file I/O
(``metrics.jsonl``, ``events.jsonl``, the resolved config, ``workers/``, ``row_ids/``, the
tokenizer copy, TensorBoard events) are written by each process into its own local
:class:`Mirror` of the run dir and uploaded from there, whole objects, only the files that
changed (each is written by one process: rank 0, one rank, or the driver):

- a worker pulls the run's files when it starts (a worker group restarted on other nodes picks up
  the records), pushes before every checkpoint report, at most every ``PUSH_EVERY_S`` on
  metrics-only reports, and once more when it stops;
- resume downloads one candidate checkpoint at a time to local scratch; the loop verifies its
  integrity manifest there before DeepSpeed unpickles anything (the rule local paths follow);
- the driver's SIGTERM marker goes up as ``RUN/.preempt``; rank 0 polls for it every ``POLL_S``
  and mirrors it where ``training.preempt.stop_reason`` looks;
- the run lock is a lease object (``training.runlock.run_lease``).

Endpoint: ``train.s3.endpoint_url``, else ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL`` (as the AWS
CLI and SDKs read them), else AWS; pyarrow's URI options (``?endpoint_override=HOST:PORT&scheme=
http&region=R``) work too. Credentials in the driver's environment travel inside the filesystem
object to the workers (whose environment may lack them); without them every process uses its own
chain (``~/.aws``, instance role). Local and NFS paths never reach this module.
"""

from __future__ import annotations

import contextlib
import logging
import os
import posixpath
import shutil
import tempfile
import threading
import time
import urllib.parse
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from training.errors import CheckpointError, TrainConfigError
from training.preempt import MARKER_NAME
from training.records import EVENTS_NAME, METRICS_NAME
from training.runlock import run_lease, run_lock

if TYPE_CHECKING:
    import pyarrow.fs as pafs

    from training.checkpoint import TrainState

__all__ = [
    "PUSH_EVERY_S",
    "Mirror",
    "RunView",
    "S3Location",
    "check_s3_storage",
    "download_checkpoints",
    "fetch_checkpoint",
    "fs_path",
    "is_s3",
    "list_checkpoints",
    "open_run",
    "parse_s3",
    "pushing_reports",
    "run_uri",
    "s3_filesystem",
    "worker_run",
]

log = logging.getLogger(__name__)
PUSH_EVERY_S = 10.0  # metrics-only reports upload at most this often; checkpoints always
POLL_S = 2.0  # the stop marker's latency between driver and rank 0 (one HEAD request per poll)
_ENDPOINT_ENV = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
_REGION_ENV = ("AWS_REGION", "AWS_DEFAULT_REGION")
_URI_OPTIONS = {"endpoint_override", "scheme", "region"}


def is_s3(path: str | os.PathLike) -> bool:
    return str(path).startswith("s3://")


def fs_path(uri: str) -> str:
    """``s3://bucket/prefix?opts`` -> ``bucket/prefix``: the path on the S3 filesystem."""
    return uri.removeprefix("s3://").split("?")[0].strip("/")


def run_uri(storage_path: str, name: str) -> str:
    """Where the run dir lives: an absolute local path, or ``s3://bucket/prefix/name``."""
    if is_s3(storage_path):
        return f"s3://{fs_path(storage_path)}/{name}"
    return str(Path(storage_path).resolve() / name)


@dataclass(frozen=True)
class S3Location:
    path: str  # bucket/prefix, no scheme or options
    endpoint: str | None  # http(s)://host[:port]; None: AWS
    region: str | None

    @property
    def bucket(self) -> str:
        return self.path.split("/")[0]


def parse_s3(uri: str, endpoint_url: str | None = None, region: str | None = None) -> S3Location:
    """Endpoint and region of an s3:// URI: its own options, then the arguments, then the env."""
    params = dict(urllib.parse.parse_qsl(uri.partition("?")[2]))
    unknown = sorted(set(params) - _URI_OPTIONS)
    if unknown:
        raise TrainConfigError(f"train.storage_path: {uri}: unknown option(s) {unknown} "
                               f"(known: {sorted(_URI_OPTIONS)})")  # fmt: skip
    if "endpoint_override" in params:
        endpoint_url = f"{params.get('scheme', 'https')}://{params['endpoint_override']}"
    env = os.environ
    endpoint = endpoint_url or next((env[k] for k in _ENDPOINT_ENV if env.get(k)), None)
    region = (
        params.get("region") or region or next((env[k] for k in _REGION_ENV if env.get(k)), None)
    )
    return S3Location(fs_path(uri), endpoint, region)


def s3_filesystem(loc: S3Location, preflight: bool = False) -> pafs.S3FileSystem:
    """The filesystem Ray Train and raylm use for the run; ``preflight``: fail fast (few retries)."""
    import pyarrow.fs as pafs

    kwargs: dict[str, Any] = {}
    if loc.endpoint:
        scheme, _, host = loc.endpoint.partition("://")
        kwargs.update(endpoint_override=host or loc.endpoint, scheme=scheme if host else "https")
    region = loc.region
    if not region and not loc.endpoint:
        with contextlib.suppress(OSError):  # no network: the check reports the endpoint
            region = pafs.resolve_s3_region(loc.bucket)
    if region:
        kwargs["region"] = region
    key, secret = os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_SECRET_ACCESS_KEY")
    if key and secret:  # pickled with the filesystem: the workers need not have them
        kwargs.update(access_key=key, secret_key=secret)
        if os.environ.get("AWS_SESSION_TOKEN"):
            kwargs["session_token"] = os.environ["AWS_SESSION_TOKEN"]
    if preflight:
        kwargs.update(connect_timeout=5, request_timeout=30,
                      retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=2))  # fmt: skip
    return pafs.S3FileSystem(**kwargs)


def _explain(exc: OSError, loc: S3Location) -> str:
    """One line on why an S3 call failed: endpoint, credentials, or S3's own words."""
    text, where = str(exc), loc.endpoint or "AWS S3"
    if "NETWORK_CONNECTION" in text or "curlCode" in text:
        return (f"cannot reach the S3 endpoint {where} ({text.split(';')[-1].strip()}); check "
                "train.s3.endpoint_url / AWS_ENDPOINT_URL and the network")  # fmt: skip
    if "ACCESS_DENIED" in text or "HTTP status 403" in text:
        env = os.environ
        who = ("the credentials from AWS_ACCESS_KEY_ID" if env.get("AWS_ACCESS_KEY_ID") else
               "no AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY in the driver's environment, and "
               "the profile or instance role found instead")  # fmt: skip
        return f"access denied at {where}: {who} may not read and write bucket {loc.bucket!r}"
    return f"S3 error at {where}: {text}"


def check_s3_storage(uri: str, endpoint_url: str | None = None, region: str | None = None) -> None:
    """Driver preflight: the bucket exists and a probe object can be written, read and deleted.

    Raises TrainConfigError naming ``train.storage_path`` (unreachable endpoint, missing bucket,
    refused credentials) before any worker starts.
    """
    import pyarrow.fs as pafs

    loc = parse_s3(uri, endpoint_url, region)
    fs = s3_filesystem(loc, preflight=True)
    where = f"train.storage_path: {uri.split('?')[0]}"
    try:
        bucket = fs.get_file_info(loc.bucket)
    except OSError as exc:
        raise TrainConfigError(f"{where}: {_explain(exc, loc)}") from None
    if bucket.type == pafs.FileType.NotFound:
        raise TrainConfigError(f"{where}: bucket {loc.bucket!r} does not exist at "
                               f"{loc.endpoint or 'AWS S3'}; create it first")  # fmt: skip
    probe = f"{loc.path}/.raylm_probe_{uuid.uuid4().hex[:12]}"
    try:
        with fs.open_output_stream(probe) as f:
            f.write(b"raylm storage probe")
        with fs.open_input_stream(probe) as f:
            f.read()
        fs.delete_file(probe)
    except OSError as exc:
        raise TrainConfigError(f"{where}: cannot write there: {_explain(exc, loc)}") from None


# ---------------------------------------------------------------- the local mirror of a run dir


def _local_only(rel: str) -> bool:
    """Not mirrored: checkpoints (Ray's, and its snapshot file), top-level dotfiles (lock,
    markers, Ray's validation file), plots (``raylm report`` output)."""
    top = rel.split("/")[0]
    return top.startswith(("checkpoint_", ".")) or top == "plots"


class Mirror:
    """One process's local copy of an S3 run dir.

    ``pull`` downloads objects; ``push`` uploads the local files whose size or mtime changed since
    they were last pulled or pushed. Files are small, so a change uploads the whole file.
    """

    def __init__(self, fs: pafs.FileSystem, remote: str, local: Path) -> None:
        self.fs, self.remote, self.local = fs, remote.rstrip("/"), local
        self._sent: dict[str, tuple[int, int]] = {}  # rel path -> (size, mtime_ns) in sync
        self._pushed_at = 0.0

    def _stamp(self, rel: str) -> None:
        st = (self.local / rel).stat()
        self._sent[rel] = (st.st_size, st.st_mtime_ns)

    def remote_files(self) -> list[str]:
        import pyarrow.fs as pafs

        sel = pafs.FileSelector(self.remote, recursive=True, allow_not_found=True)
        rels = (i.path[len(self.remote) + 1 :] for i in self.fs.get_file_info(sel) if i.is_file)
        return sorted(r for r in rels if not _local_only(r))

    def pull(self, names: Iterable[str] | None = None) -> None:
        """Download ``names`` (relative paths; missing ones skipped), or every mirrored file."""
        for rel in self.remote_files() if names is None else names:
            try:
                with self.fs.open_input_stream(f"{self.remote}/{rel}") as f:
                    data = f.read()
            except FileNotFoundError:
                continue
            dst = self.local / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.write_bytes(data)
            self._stamp(rel)

    def push(self, throttle: bool = False) -> None:
        """Upload what changed locally; ``throttle``: skip if the last push was < PUSH_EVERY_S ago."""
        if throttle and time.monotonic() - self._pushed_at < PUSH_EVERY_S:
            return
        for path in sorted(self.local.rglob("*")):
            rel = path.relative_to(self.local).as_posix()
            if not path.is_file() or _local_only(rel):
                continue
            st = path.stat()
            if self._sent.get(rel) == (st.st_size, st.st_mtime_ns):
                continue
            self.put(rel, path.read_bytes())
            self._sent[rel] = (st.st_size, st.st_mtime_ns)
        self._pushed_at = time.monotonic()

    def put(self, rel: str, data: bytes) -> None:
        with self.fs.open_output_stream(f"{self.remote}/{rel}") as f:
            f.write(data)

    def exists(self, rel: str) -> bool:
        import pyarrow.fs as pafs

        return self.fs.get_file_info(f"{self.remote}/{rel}").type == pafs.FileType.File

    def delete(self, rel: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.fs.delete_file(f"{self.remote}/{rel}")


@contextlib.contextmanager
def _polling(tick: Callable[[], bool], name: str) -> Iterator[None]:
    """Call ``tick`` every POLL_S on a daemon thread until it returns True or the block ends."""
    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(POLL_S):
            try:
                if tick():
                    return
            except OSError as exc:  # a flaky request; the next poll retries
                log.warning("%s: %s", name, exc)

    thread = threading.Thread(target=loop, name=name, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=30)


def _marker_down(mirror: Mirror) -> Callable[[], bool]:
    """Rank 0: the driver's stop marker on S3 -> the local file ``stop_reason`` looks for."""

    def tick() -> bool:
        if not mirror.exists(MARKER_NAME):
            return False
        (mirror.local / MARKER_NAME).write_text("stop requested through S3\n", "utf-8")
        return True

    return tick


def pushing_reports(mirror: Mirror, report: Callable[..., None]) -> Callable[..., None]:
    """The loop's reporter, uploading the side files first: always before a checkpoint (so the
    metrics rows up to it are on S3 with it), at most every PUSH_EVERY_S otherwise."""

    def wrapped(
        metrics: dict[str, Any], checkpoint_dir: Path | None, step: int, *name: str
    ) -> None:
        mirror.push(throttle=checkpoint_dir is None)
        report(metrics, checkpoint_dir, step, *name)

    return wrapped


def _owned_by(rel: str, rank: int) -> bool:
    """Files this rank writes (and so needs back on resume): its own ``row_ids/`` and
    ``workers/`` records; on rank 0 also every run-level file (metrics, events, tokenizer...)."""
    top, _, rest = rel.partition("/")
    if top in ("row_ids", "workers"):
        return rest.startswith(f"rank_{rank}.")
    return rank == 0


@contextlib.contextmanager
def worker_run(fs: pafs.FileSystem, uri: str, rank: int) -> Iterator[Mirror]:
    """A worker's mirror of the S3 run dir ``uri``: pulled now, pushed when the block ends (a
    failed final push fails a run that otherwise succeeded); rank 0 also watches for the driver's
    stop marker."""
    mirror = Mirror(fs, fs_path(uri), Path(tempfile.mkdtemp(prefix=f"raylm_run_r{rank}_")))
    try:
        try:
            mirror.pull([r for r in mirror.remote_files() if _owned_by(r, rank)])
        except OSError as exc:  # e.g. a node that cannot reach the endpoint the driver could
            raise OSError(f"train.storage_path: rank {rank} cannot read {uri}: {exc}") from exc
        watch = _polling(_marker_down(mirror), "raylm-stop-marker") if rank == 0 else None
        with watch or contextlib.nullcontext():
            yield mirror
    except BaseException:
        with contextlib.suppress(OSError):  # best effort; the original error matters more
            mirror.push()
        raise
    else:
        mirror.push()
    finally:
        shutil.rmtree(mirror.local, ignore_errors=True)


# ---------------------------------------------------------------- the driver's view


@dataclass
class RunView:
    """The driver's handle on a run dir; it reads and writes the run's files under ``local``."""

    uri: str  # what users see: /abs/storage/name or s3://bucket/prefix/name
    local: Path  # the run dir itself, or (S3) this process's mirror of it
    mirror: Mirror | None = None

    @property
    def fs(self) -> pafs.FileSystem | None:
        return self.mirror.fs if self.mirror else None

    def sync(self, pull: Iterable[str] = ()) -> None:
        """S3: upload what this process wrote, then download ``pull``; local: nothing to do."""
        if self.mirror:
            self.mirror.push()
            self.mirror.pull(pull)

    @contextlib.contextmanager
    def follow(self, progress: bool) -> Iterator[None]:
        """S3, around ``fit()``: the driver's SIGTERM marker goes up (a leftover one is deleted
        first); with ``progress`` the metrics rows come down for the progress bar."""
        m = self.mirror
        if m is None:
            yield
            return
        m.delete(MARKER_NAME)
        sent: list[bool] = []

        def tick() -> bool:
            if not sent and (m.local / MARKER_NAME).exists():
                m.put(MARKER_NAME, (m.local / MARKER_NAME).read_bytes())
                sent.append(True)
            if progress:
                m.pull([METRICS_NAME])
            return bool(sent) and not progress

        try:
            with _polling(tick, "raylm-driver-sync"):
                yield
        finally:
            m.delete(MARKER_NAME)


_views: dict[str, RunView] = {}  # S3 run URI -> the open view (re-entrant, like the lock)


@contextlib.contextmanager
def open_run(
    storage_path: str, name: str, endpoint_url: str | None = None, region: str | None = None
) -> Iterator[RunView]:
    """The run's lock (``flock``; S3: a lease) and this driver's view of the run dir; re-entrant.

    S3: the view is a fresh local mirror holding the run's events and metrics; what the driver
    writes there (the resolved config) goes up on :meth:`RunView.sync` and when the block ends.
    """
    uri = run_uri(storage_path, name)
    if not is_s3(storage_path):
        with run_lock(uri) as rd:
            yield RunView(uri, rd)
        return
    if uri in _views:
        yield _views[uri]
        return
    loc = parse_s3(storage_path, endpoint_url, region)
    fs = s3_filesystem(loc)
    run_path = f"{loc.path}/{name}"
    with run_lease(fs, run_path, uri):
        view = RunView(uri, Path(tempfile.mkdtemp(prefix="raylm_driver_")))
        view.mirror = Mirror(fs, run_path, view.local)
        _views[uri] = view
        try:
            view.mirror.pull([EVENTS_NAME, METRICS_NAME])
            yield view
            view.sync()
        finally:
            del _views[uri]
            shutil.rmtree(view.local, ignore_errors=True)


# ---------------------------------------------------------------- checkpoints on S3


def list_checkpoints(fs: pafs.FileSystem, run_path: str, first: str | None = None) -> list[str]:
    """``checkpoint_*`` dirs of a run on ``fs``, newest first (``first``, Ray's latest, leads)."""
    import pyarrow.fs as pafs

    sel = pafs.FileSelector(run_path.rstrip("/"), allow_not_found=True)
    found = sorted((i.path for i in fs.get_file_info(sel) if i.type == pafs.FileType.Directory
                    and posixpath.basename(i.path).startswith("checkpoint_")), reverse=True)  # fmt: skip
    if first is None:
        return found
    return [first] + [p for p in found if p.rstrip("/") != first.rstrip("/")]


def download_checkpoints(
    fs: pafs.FileSystem, paths: list[str], into: Path | None = None
) -> Iterator[Path]:
    """Each checkpoint in turn, downloaded under ``into`` (default: a new temp dir) and deleted
    when the next one is asked for or the iteration ends: at most one on local disk at a time.

    Every rank downloads the whole checkpoint (as Ray's ``Checkpoint.as_directory`` does), so
    every rank reaches the same verdict on its integrity.
    """
    import pyarrow.fs as pafs

    scratch = into or Path(tempfile.mkdtemp(prefix="raylm_download_"))
    try:
        for path in paths:
            dst = scratch / posixpath.basename(path.rstrip("/"))
            pafs.copy_files(path, str(dst), source_filesystem=fs,
                            destination_filesystem=pafs.LocalFileSystem(), use_threads=True)  # fmt: skip
            yield dst
            shutil.rmtree(dst, ignore_errors=True)
    finally:
        if into is None:  # a caller's dir is the caller's to delete
            shutil.rmtree(scratch, ignore_errors=True)


@contextlib.contextmanager
def fetch_checkpoint(uri: str, fs: pafs.FileSystem) -> Iterator[tuple[Path, TrainState, str]]:
    """``raylm export s3://...``: the checkpoint given, or the run's newest one that verifies,
    downloaded with the run's ``tokenizer/`` next to it (where export looks); yields (local dir,
    its verified state, its s3:// URI). Skipped checkpoints are named in a warning, as for local
    runs."""
    from training.checkpoint import STATE_NAME, verify_checkpoint

    path = fs_path(uri)
    if _is_file(fs, f"{path}/{STATE_NAME}"):
        run, paths = posixpath.dirname(path), [path]
    else:
        run, paths = path, list_checkpoints(fs, path)
    if not paths:
        raise CheckpointError(f"{uri}: neither a checkpoint nor a run dir with checkpoints")
    root = Path(tempfile.mkdtemp(prefix="raylm_export_"))
    try:
        tok = Mirror(fs, f"{run}/tokenizer", root / "tokenizer")
        tok.pull()
        skipped: list[str] = []
        for local in download_checkpoints(fs, paths, into=root):
            try:
                state = verify_checkpoint(local)
            except CheckpointError as exc:
                skipped.append(str(exc).replace(str(local), f"s3://{run}/{local.name}"))
                continue
            origin = f"s3://{run}/{local.name}"
            if skipped:
                log.warning("exporting %s; skipped: %s", origin, "; ".join(skipped))
            yield local, state, origin
            return
        raise CheckpointError("no intact checkpoint: " + "; ".join(skipped))
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _is_file(fs: pafs.FileSystem, path: str) -> bool:
    import pyarrow.fs as pafs

    return fs.get_file_info(path).type == pafs.FileType.File
