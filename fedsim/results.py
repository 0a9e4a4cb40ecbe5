"""The run directory: resolved scenario, metrics, summary, model file, plots, checkpoints.

A run writes into ``<name>.incomplete`` beside the requested folder and renames it to
``<name>`` only when the run completed, so a folder under its final name is always a
finished result, and whatever stopped a run (an error, Ctrl-C, kill -9, a power cut)
leaves a visible ``<name>.incomplete`` that ``fedsim run --resume <name>`` continues
(from its last checkpoint, else from the start). A run that fails also leaves
``error.txt`` there. The folder is locked while a process works in it.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import platform
import re
import shutil
import time
import traceback
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fedsim.errors import ScenarioError

if TYPE_CHECKING:
    from fedsim.engine.checkpoint import Snapshot

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
MODEL_FILE = "model.safetensors"
PARTICIPATION_FILE = "participation.csv"
PRIVACY_CLIENTS_FILE = "privacy_clients.csv"  # per-client epsilon (local and sample DP)
TIMING_FIELDS = ("round_wall_s",)
SCENARIO_FILE = "scenario.toml"
MARKER_FILE = ".fedsim-run"  # says "a fedsim run folder"; locked while a run works in it
CHECKPOINT_DIR = "checkpoint"
CHECKPOINT_FILE = "checkpoint.json"
CHECKPOINT_FORMAT = "fedsim-checkpoint"
CHECKPOINT_VERSION = 1
INCOMPLETE = ".incomplete"


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for dist in ("fedsim", "flwr", "ray", "torch", "numpy"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "unknown"
    return out


def default_out_dir(name: str) -> Path:
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    out = Path("runs") / f"{name}-{stamp}"
    n = 1
    while out.exists() or incomplete_dir(out).exists():
        n += 1
        out = Path("runs") / f"{name}-{stamp}-{n}"
    return out


def incomplete_dir(out: Path) -> Path:
    """Where a run into ``out`` is written until it completes."""
    return out.with_name(out.name + INCOMPLETE)


def cannot_create(path: Path) -> str | None:
    """Why a folder cannot be made (or filled) at ``path`` (None if it can): ``path``, or
    its nearest existing ancestor, is a file, or takes no new entry (a probe folder made
    there, then removed: permissions alone do not tell, e.g. for root on a read-only or
    virtual file system)."""
    import tempfile

    here = path
    while not here.exists() and here != here.absolute().parent:
        here = here.absolute().parent
    if not here.is_dir():
        return f"{here} is a file, not a folder"
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".fedsim-probe-", dir=here))
    except OSError as exc:
        return f"no folder can be made in {here} ({exc.strerror})"
    return None


def check_out_dir(out: Path) -> None:
    """ScenarioError unless ``out`` is absent or an empty folder, no unfinished run into
    it is left, and the run's folder can be made there."""
    if out.exists() and not out.is_dir():
        raise ScenarioError([("--out", f"{out} is a file, not a folder")])
    if out.exists() and any(out.iterdir()):
        raise ScenarioError([("--out", f"{out} already exists and is not empty")])
    inc = incomplete_dir(out)
    if inc.exists():
        raise ScenarioError(
            [
                (
                    "--out",
                    f"{inc} is an unfinished run: continue it with `fedsim run --resume {out}` "
                    "or remove it",
                )
            ]
        )
    why = cannot_create(inc)  # (a run is written into <out>.incomplete, then renamed)
    if why is not None:
        raise ScenarioError([("--out", f"cannot create {out}: {why}")])


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``path`` so that it holds either its old content or ``data``, whatever
    happens meanwhile: a temporary file, fsync, rename, fsync of the folder."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _json_safe(obj: Any) -> Any:
    """NaN and infinities (a diverged run) become null: strict JSON has no NaN."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_json_safe(v) for v in obj]
    return obj


class RunDir:
    """A run's folder while it runs (``<out>.incomplete``), locked by this process.

    ``RunDir(out)`` starts a new one; ``RunDir(out, resume=True)`` takes over the folder
    an earlier run into ``out`` left.
    """

    def __init__(self, out: Path, *, resume: bool = False) -> None:
        self.final = Path(out)
        self.tmp = incomplete_dir(self.final)
        if resume:
            check_resumable(self.final)
        else:
            check_out_dir(self.final)
            self.final.parent.mkdir(parents=True, exist_ok=True)
            try:
                self.tmp.mkdir()  # exclusive: two runs into one folder cannot both start
            except FileExistsError:
                check_out_dir(self.final)  # names the unfinished run
                raise
        self._lock = _lock(self.tmp / MARKER_FILE, wait_s=RELEASE_WAIT_S if resume else 0.0)
        self._metrics = None

    def path(self, name: str) -> Path:
        return self.tmp / name

    def open_metrics(self, records: list[dict[str, Any]] | None = None) -> None:
        """Start metrics.jsonl: empty, or (a resumed run) holding exactly ``records``."""
        lines = "".join(_metrics_line(r) for r in records or [])
        write_atomic(self.path(METRICS_FILE), lines.encode("utf-8"))
        self._metrics = self.path(METRICS_FILE).open("a", encoding="utf-8")

    def write_text(self, name: str, text: str) -> None:
        write_atomic(self.path(name), text.encode("utf-8"))

    def write_json(self, name: str, obj: Any) -> None:
        self.write_text(name, json.dumps(_json_safe(obj), indent=2, allow_nan=False) + "\n")

    def append_round(self, record: dict[str, Any]) -> None:
        assert self._metrics is not None, "open_metrics first"
        self._metrics.write(_metrics_line(record))
        self._metrics.flush()

    def write_model(self, arrays: dict[str, np.ndarray]) -> None:
        from safetensors.numpy import save_file

        tensors = {k: np.ascontiguousarray(v) for k, v in arrays.items()}
        # One metadata key only: safetensors writes metadata from a hash map, so several
        # keys come out in a per-process order and the file bytes would differ run to run.
        save_file(tensors, str(self.path(MODEL_FILE)), metadata={"format": "pt"})

    def write_checkpoint(self, snap: Snapshot, scenario_sha256: str) -> None:
        """Write ``snap`` so that the folder always holds one whole checkpoint: the
        arrays under a new name first, then the JSON that names them (and their sha256),
        each atomically; then the previous arrays file goes."""
        from safetensors.numpy import save

        folder = self.path(CHECKPOINT_DIR)
        folder.mkdir(exist_ok=True)
        tensors = {f"model/{k}": np.ascontiguousarray(v) for k, v in snap.model.items()}
        tensors.update({f"state/{k}": v for k, v in snap.arrays.items()})
        data = save(tensors, metadata={"format": "np"})
        name = f"round-{snap.round:06d}.safetensors"
        write_atomic(folder / name, data)
        body = {
            "format": CHECKPOINT_FORMAT,
            "version": CHECKPOINT_VERSION,
            "round": snap.round,
            "clock": snap.clock,
            "scenario_sha256": scenario_sha256,
            "arrays_file": name,
            "arrays_sha256": hashlib.sha256(data).hexdigest(),
            "model_keys": list(snap.model),
            "state": snap.tree,
            "records": _json_safe(snap.records),
            "initial_eval": _json_safe(snap.initial_eval),
            "versions": versions(),
        }
        doc = {**body, "body_sha256": _body_sha256(body)}
        write_atomic(
            folder / CHECKPOINT_FILE, json.dumps(doc, allow_nan=False, indent=1).encode("utf-8")
        )
        for old in folder.glob("round-*.safetensors"):
            if old.name != name:
                old.unlink(missing_ok=True)

    def commit(self) -> Path:
        if self._metrics is not None:
            self._metrics.close()
        try:
            check_out_dir_final(self.final)  # something may have appeared there meanwhile
            shutil.rmtree(self.path(CHECKPOINT_DIR), ignore_errors=True)
            self.path(MARKER_FILE).unlink(missing_ok=True)
            if self.final.exists():
                self.final.rmdir()
            os.rename(self.tmp, self.final)
        except (ScenarioError, OSError) as exc:
            raise RuntimeError(f"cannot move the finished run to {self.final}: {exc}") from None
        finally:
            self.release()
        return self.final

    def abandon(self, exc: BaseException) -> Path:
        if self._metrics is not None:
            self._metrics.close()
        self.write_text("error.txt", "".join(traceback.format_exception(exc)))
        self.release()
        return self.tmp

    def release(self) -> None:
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None


def check_out_dir_final(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ScenarioError([("--out", f"{out} already exists and is not empty")])


# A run that just died may live on for a moment in processes it forked (which hold
# its lock until they exit): --resume waits this long for the lock before it says the
# folder is in use.
RELEASE_WAIT_S = 10.0


def _lock(marker: Path, *, wait_s: float = 0.0) -> int:
    """Lock ``marker`` (created if absent) for this process's lifetime; the kernel drops
    the lock when the process dies, however it dies. A lock held by another process is
    waited for up to ``wait_s``."""
    fd = os.open(marker, os.O_RDWR | os.O_CREAT, 0o644)
    deadline = time.monotonic() + wait_s
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.monotonic() < deadline:
                time.sleep(0.2)
                continue
            os.close(fd)
            raise ScenarioError(
                [("--resume", f"{marker.parent} is in use by a running fedsim")]
            ) from None
    info = json.dumps({"fedsim": versions()["fedsim"], "pid": os.getpid()}) + "\n"
    os.ftruncate(fd, 0)
    os.pwrite(fd, info.encode(), 0)
    return fd


def resume_target(path: Path) -> Path:
    """The ``out`` of the unfinished run ``path`` names (``DIR`` or ``DIR.incomplete``)."""
    path = Path(path)
    return path.with_name(path.name[: -len(INCOMPLETE)]) if path.name.endswith(INCOMPLETE) else path


def check_resumable(out: Path) -> None:
    """ScenarioError (key ``--resume``) unless ``out.incomplete`` is a fedsim run folder
    that did not finish."""
    inc = incomplete_dir(out)
    if not inc.is_dir():
        if (out / SUMMARY_FILE).is_file():
            why = f"{out} is a finished run: nothing to resume"
        elif out.exists():
            why = f"{out} is not an unfinished fedsim run (no {inc.name} beside it)"
        else:
            why = f"no unfinished run {inc}"
        raise ScenarioError([("--resume", why)])
    if not (inc / MARKER_FILE).is_file() or not (inc / SCENARIO_FILE).is_file():
        raise ScenarioError(
            [
                (
                    "--resume",
                    f"{inc} is not a fedsim run folder (no {MARKER_FILE} or {SCENARIO_FILE})",
                )
            ]
        )
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ScenarioError([("--resume", f"{out} already exists: cannot finish {inc} into it")])


def _body_sha256(body: dict[str, Any]) -> str:
    return hashlib.sha256(
        json.dumps(body, sort_keys=True, allow_nan=False).encode("utf-8")
    ).hexdigest()


_ARRAYS_NAME = re.compile(r"^round-[0-9]{6,}\.safetensors$")


def read_checkpoint(run_dir: Path, scenario_sha256: str) -> Snapshot | None:
    """The checkpoint in ``run_dir`` (None if there is none), checked whole: a corrupt,
    truncated or edited one, or one written for another scenario, is a ScenarioError."""
    from safetensors import SafetensorError
    from safetensors.numpy import load

    from fedsim.engine.checkpoint import Snapshot

    folder = Path(run_dir) / CHECKPOINT_DIR
    path = folder / CHECKPOINT_FILE

    def refuse(why: str) -> ScenarioError:
        return ScenarioError([("--resume", f"checkpoint {path}: {why}; cannot resume from it")])

    if not path.exists():
        return None
    try:
        doc = json.loads(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise refuse(f"unreadable or corrupt ({exc})") from None
    if not isinstance(doc, dict) or doc.get("format") != CHECKPOINT_FORMAT:
        raise refuse("not a fedsim checkpoint")
    if doc.get("version") != CHECKPOINT_VERSION:
        raise refuse(
            f"format version {doc.get('version')!r}, this fedsim reads {CHECKPOINT_VERSION}"
        )
    body = {k: v for k, v in doc.items() if k != "body_sha256"}
    if doc.get("body_sha256") != _body_sha256(body):
        raise refuse("its content does not match its checksum (edited or corrupt)")
    if doc["scenario_sha256"] != scenario_sha256:
        raise refuse(
            f"written for another scenario (sha256 {str(doc['scenario_sha256'])[:12]}..., "
            f"this folder's {SCENARIO_FILE} has {scenario_sha256[:12]}...)"
        )
    name = doc.get("arrays_file")
    if not isinstance(name, str) or not _ARRAYS_NAME.match(name):
        raise refuse(f"bad arrays file name {name!r}")
    try:
        data = (folder / name).read_bytes()
    except OSError as exc:
        raise refuse(f"cannot read {name} ({exc.strerror})") from None
    if hashlib.sha256(data).hexdigest() != doc["arrays_sha256"]:
        raise refuse(f"{name} does not match its sha256 (truncated, edited or corrupt)")
    try:
        tensors = load(data)
    except (SafetensorError, ValueError) as exc:
        raise refuse(f"{name} is unreadable ({exc})") from None
    try:
        model = {k: tensors[f"model/{k}"] for k in doc["model_keys"]}
        arrays = {k[len("state/") :]: v for k, v in tensors.items() if k.startswith("state/")}
        snap = Snapshot(
            round=int(doc["round"]),
            clock=float(doc["clock"]),
            tree=doc["state"],
            arrays=arrays,
            model=model,
            records=list(doc["records"]),
            initial_eval=doc["initial_eval"],
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise refuse(f"malformed ({type(exc).__name__}: {exc})") from None
    if len(snap.records) != snap.round:
        raise refuse(f"{len(snap.records)} round records for round {snap.round}")
    return snap


def _metrics_line(record: dict[str, Any]) -> str:
    return json.dumps(_json_safe(record), allow_nan=False) + "\n"


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    with (Path(run_dir) / METRICS_FILE).open(encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def without_timing(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in r.items() if k not in TIMING_FIELDS} for r in records]
