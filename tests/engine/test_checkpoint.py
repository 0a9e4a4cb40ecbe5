"""Checkpoint and resume: a run stopped after round r (an error, kill -9) and resumed
finishes bit-identically to one that never stopped; what cannot be resumed is refused
with one line; kill -9 of a worker fails only its clients."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from fedsim.cli import main
from fedsim.engine.coordinator import Coordinator
from fedsim.results import (
    CHECKPOINT_DIR,
    CHECKPOINT_FILE,
    MODEL_FILE,
    read_metrics,
    without_timing,
)
from fedsim.runner import execute, resume
from fedsim.scenario import load_scenario

REPO = Path(__file__).resolve().parents[2]
CHURN = str(REPO / "scenarios" / "churn_markov.toml")
# A stateful strategy (server Adam moments) under churn: Markov availability (its own
# random state), dropouts, stragglers past a deadline, over-commitment.
STATEFUL = [
    "run.rounds=6",
    "run.checkpoint_every=1",
    "strategy.name=fedadam",
    "strategy.eta=0.01",
]
FEDSIM_BIN = str(Path(sys.executable).parent / "fedsim")


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _same_run(a: Path, b: Path) -> None:
    assert _sha(a / MODEL_FILE) == _sha(b / MODEL_FILE)
    assert without_timing(read_metrics(a)) == without_timing(read_metrics(b))
    assert (a / "participation.csv").read_bytes() == (b / "participation.csv").read_bytes()
    sa, sb = (json.loads((p / "summary.json").read_text()) for p in (a, b))
    for key in ("rounds_completed", "eval_accuracy", "virtual_time_s", "model_sha256"):
        assert sa[key] == sb[key], key


def _checkpoint_round(run: Path) -> int | None:
    try:
        doc = json.loads((run / CHECKPOINT_DIR / CHECKPOINT_FILE).read_text())
    except (OSError, ValueError):
        return None
    return doc["round"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, _ray_session):
    out = tmp_path_factory.mktemp("full") / "run"
    execute(load_scenario(CHURN, STATEFUL), out=out)
    return out


def _crash_in_round(monkeypatch, n: int) -> None:
    original = Coordinator._begin

    def begin(self, number):
        if number == n:
            raise RuntimeError("power cut")
        return original(self, number)

    monkeypatch.setattr(Coordinator, "_begin", begin)


def _crash_resume_same(tmp_path, monkeypatch, over, *, crash: int, checkpoint: int) -> Path:
    """Run ``over`` in full; run it again stopped as round ``crash`` begins (its last
    checkpoint after round ``checkpoint``), resume it, and check both runs are the
    same. Returns the full run's folder."""
    full = execute(load_scenario(None, over), out=tmp_path / "full").out_dir
    _crash_in_round(monkeypatch, crash)
    with pytest.raises(RuntimeError):
        execute(load_scenario(None, over), out=tmp_path / "run")
    assert _checkpoint_round(tmp_path / "run.incomplete") == checkpoint
    monkeypatch.undo()
    _same_run(resume(tmp_path / "run").out_dir, full)
    return full


def test_a_run_that_failed_resumes_to_the_same_result(
    tmp_path, monkeypatch, ray_cluster, uninterrupted
):
    out = tmp_path / "run"
    _crash_in_round(monkeypatch, 5)
    with pytest.raises(RuntimeError, match="power cut"):
        execute(load_scenario(CHURN, STATEFUL), out=out)
    inc = tmp_path / "run.incomplete"
    assert not out.exists() and (inc / "error.txt").exists()
    done = _checkpoint_round(inc)
    assert done is not None and 3 <= done < 5
    assert len(read_metrics(inc)) >= done
    monkeypatch.undo()
    res = resume(out)
    assert res.out_dir == out and not inc.exists()
    assert res.summary["resumed_after_round"] == done
    assert not (out / CHECKPOINT_DIR).exists() and not (out / "error.txt").exists()
    _same_run(out, uninterrupted)


def test_resume_without_a_checkpoint_starts_over(tmp_path, monkeypatch, ray_cluster):
    scn = load_scenario(None, ["run.rounds=3", "data.num_clients=4", "model.hidden=[8]"])
    full = execute(scn, out=tmp_path / "full").out_dir
    _crash_in_round(monkeypatch, 2)
    with pytest.raises(RuntimeError):
        execute(scn, out=tmp_path / "run")
    assert _checkpoint_round(tmp_path / "run.incomplete") is None
    monkeypatch.undo()
    res = resume(tmp_path / "run.incomplete")  # either name works
    assert res.summary["resumed_after_round"] is None
    _same_run(res.out_dir, full)


COUNTER = """
from typing import Literal
from flwr.app import ConfigRecord
from clients.behaviour import Outcome, SgdClient
from fedsim.client_params import CLIENTS

@CLIENTS.register("ckpt_counter")
class Counter(SgdClient):
    keeps_state = True
    behaviour: Literal["ckpt_counter"] = "ckpt_counter"

    def train(self, task):
        out = super().train(task)
        n = int(task.state.get("c", ConfigRecord({"n": 0}))["n"]) + 1
        task.state["c"] = ConfigRecord({"n": n})
        return Outcome(out.num_examples, {"train_loss": float(n)})
"""


@pytest.fixture(scope="module")
def counter_plugin(tmp_path_factory):
    path = tmp_path_factory.mktemp("plugin") / "ckpt_counter.py"
    path.write_text(COUNTER)
    return path


def test_client_states_survive_a_resume(tmp_path, monkeypatch, ray_cluster, counter_plugin):
    plugin = counter_plugin
    over = [
        f"run.plugins=['{plugin}']",
        "run.rounds=5",
        "run.checkpoint_every=2",
        "data.num_clients=6",
        "model.hidden=[8]",
        "client.behaviour=ckpt_counter",
        "strategy.clients_per_round=3",
    ]
    full = _crash_resume_same(tmp_path, monkeypatch, over, crash=4, checkpoint=2)
    counts = [r["train_loss"] for r in read_metrics(full)]
    assert max(counts) > 1.5  # clients came back with their counts


def test_flower_engine_resumes_too(tmp_path, monkeypatch, ray_cluster):
    over = [
        "run.rounds=4",
        "run.checkpoint_every=1",
        "data.num_clients=4",
        "model.hidden=[8]",
        "strategy.name=fedavgm",
        "strategy.server_momentum=0.9",
        "simulation.engine=flower",
    ]
    _crash_resume_same(tmp_path, monkeypatch, over, crash=3, checkpoint=2)


ADAPTIVE = [
    "privacy.dp.mode=central",
    "privacy.dp.clipping=adaptive",
    "privacy.dp.clip_norm=0.05",
    "privacy.dp.clipped_count_stddev=1",
]
LOCAL = ["privacy.dp.mode=local", "privacy.dp.clip_norm=0.5"]


@pytest.mark.parametrize(
    ("engine", "dp"),
    [("fedsim", ADAPTIVE), ("flower", ADAPTIVE), ("fedsim", LOCAL)],
    ids=["adaptive-fedsim", "adaptive-flower", "local-fedsim"],
)
def test_the_privacy_state_survives_a_resume(tmp_path, monkeypatch, ray_cluster, engine, dp):
    """Adaptive clipping's C_t and local DP's per-client counts."""
    over = [
        "run.rounds=4",
        "run.checkpoint_every=1",
        "data.num_clients=6",
        "model.hidden=[8]",
        "strategy.clients_per_round=4",
        *dp,
        "privacy.dp.noise_multiplier=0.8",
        "privacy.delta=1e-3",
        f"simulation.engine={engine}",
    ]
    full = _crash_resume_same(tmp_path, monkeypatch, over, crash=3, checkpoint=2)
    recs = read_metrics(full)
    if dp is ADAPTIVE:
        assert len({r["dp_clip_norm"] for r in recs}) == 4  # C moved every round
    else:
        eps = [r["dp_epsilon"] for r in recs]
        assert eps == sorted(eps) and eps[-1] > eps[0]
        resumed = (tmp_path / "run" / "privacy_clients.csv").read_text()
        assert resumed == (full / "privacy_clients.csv").read_text()


def test_flower_engine_refuses_checkpoints_of_stateful_clients(counter_plugin):
    from fedsim.errors import ScenarioError

    with pytest.raises(ScenarioError, match="run.checkpoint_every"):
        load_scenario(
            None,
            [
                f"run.plugins=['{counter_plugin}']",
                "run.checkpoint_every=1",
                "client.behaviour=ckpt_counter",
                "simulation.engine=flower",
            ],
        )


# ------------------------------------------------------------------- refusals


@pytest.fixture(scope="module")
def stopped(tmp_path_factory, _ray_session):
    """An unfinished run with a checkpoint after round 2 (stopped in round 3)."""
    base = tmp_path_factory.mktemp("stopped")
    mp = pytest.MonkeyPatch()
    _crash_in_round(mp, 3)
    try:
        with pytest.raises(RuntimeError):
            execute(
                load_scenario(
                    None,
                    [
                        "run.rounds=4",
                        "run.checkpoint_every=2",
                        "data.num_clients=4",
                        "model.hidden=[8]",
                        "strategy.name=fedadam",
                    ],
                ),
                out=base / "run",
            )
    finally:
        mp.undo()
    assert _checkpoint_round(base / "run.incomplete") == 2
    return base / "run.incomplete"


def _copy(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "run.incomplete"
    shutil.copytree(src, dst)
    return dst


def _refused(capsys, *argv: str) -> str:
    capsys.readouterr()
    assert main(["run", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert "Traceback" not in err[0]
    return err[0]


def _edit_arrays(inc: Path) -> None:
    from safetensors.numpy import load_file, save_file

    path = next((inc / CHECKPOINT_DIR).glob("round-*.safetensors"))
    tensors = load_file(str(path))
    name = next(k for k in tensors if k.startswith("model/"))
    tensors[name] = tensors[name] + 1.0  # a well-formed file with other numbers
    save_file(tensors, str(path), metadata={"format": "np"})


def _truncate(inc: Path) -> None:
    path = next((inc / CHECKPOINT_DIR).glob("round-*.safetensors"))
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _edit_json(inc: Path) -> None:
    path = inc / CHECKPOINT_DIR / CHECKPOINT_FILE
    doc = json.loads(path.read_text())
    doc["clock"] = 12345.0
    path.write_text(json.dumps(doc))


def _cut_json(inc: Path) -> None:
    path = inc / CHECKPOINT_DIR / CHECKPOINT_FILE
    path.write_bytes(path.read_bytes()[:100])


def _edit_scenario(inc: Path) -> None:
    path = inc / "scenario.toml"
    path.write_text(path.read_text().replace("rounds = 4", "rounds = 5"))


@pytest.mark.parametrize(
    ("damage", "says"),
    [
        (_truncate, "does not match its sha256"),
        (_edit_arrays, "does not match its sha256"),
        (_edit_json, "does not match its checksum"),
        (_cut_json, "unreadable or corrupt"),
        (_edit_scenario, "written for another scenario"),
    ],
)
def test_a_damaged_or_foreign_checkpoint_is_refused(tmp_path, capsys, stopped, damage, says):
    inc = _copy(stopped, tmp_path)
    damage(inc)
    before = sorted((p.name, p.stat().st_size) for p in inc.rglob("*"))
    line = _refused(capsys, "--resume", str(tmp_path / "run"))
    assert says in line and "cannot resume" in line, line
    assert sorted((p.name, p.stat().st_size) for p in inc.rglob("*")) == before  # untouched


def test_what_is_not_an_unfinished_run_is_refused(tmp_path, capsys, uninterrupted, stopped):
    assert "is a finished run" in _refused(capsys, "--resume", str(uninterrupted))
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "cat.jpg").write_bytes(b"\xff\xd8")
    assert "is not an unfinished fedsim run" in _refused(capsys, "--resume", str(foreign))
    fake = tmp_path / "fake.incomplete"
    fake.mkdir()
    (fake / "scenario.toml").write_text("[run]\n")
    assert "is not a fedsim run folder" in _refused(capsys, "--resume", str(fake))
    assert "no unfinished run" in _refused(capsys, "--resume", str(tmp_path / "nothing"))
    inc = _copy(stopped, tmp_path)
    line = _refused(capsys, "scenarios/quickstart.toml", "--resume", str(inc))
    assert "drop a scenario file" in line
    assert "drop --set" in _refused(capsys, "--resume", str(inc), "--set", "run.rounds=9")
    # A new run into that folder's name is refused too: resume it or remove it.
    line = _refused(capsys, "--out", str(tmp_path / "run"))
    assert "is an unfinished run" in line and "--resume" in line


@contextlib.contextmanager
def _held(marker: Path, seconds: float):
    """Another process holding ``marker``'s lock for ``seconds`` (then exiting)."""
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import fcntl, os, time\n"
            f"fd = os.open({str(marker)!r}, os.O_RDWR | os.O_CREAT)\n"
            "fcntl.flock(fd, fcntl.LOCK_EX)\n"
            "print('locked', flush=True)\n"
            f"time.sleep({seconds})\n",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        yield
    finally:
        holder.kill()
        holder.wait()


def test_a_folder_in_use_is_refused(tmp_path, capsys, stopped, monkeypatch):
    monkeypatch.setattr("fedsim.results.RELEASE_WAIT_S", 0.5)
    inc = _copy(stopped, tmp_path)
    with _held(inc / ".fedsim-run", 60):
        assert "in use by a running fedsim" in _refused(capsys, "--resume", str(inc))


def test_a_lock_let_go_within_the_wait_is_taken(tmp_path):
    # (a run that just died can live on for a moment in processes it forked)
    from fedsim.errors import ScenarioError
    from fedsim.results import _lock

    marker = tmp_path / ".fedsim-run"
    with _held(marker, 1.5):
        with pytest.raises(ScenarioError, match="in use"):
            _lock(marker)
        os.close(_lock(marker, wait_s=30))


# ----------------------------------------------------------------- real processes


def _name(p: psutil.Process) -> str:
    try:
        return " ".join(p.cmdline()) or p.name()
    except psutil.Error:
        return f"pid {p.pid} (gone)"


def _wait_gone(procs: list[psutil.Process], timeout: float = 60.0) -> list[psutil.Process]:
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    return alive


def _env() -> dict[str, str]:
    return {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "RAY_USAGE_STATS_ENABLED": "0"}


def test_kill_9_after_round_3_then_resume_is_bit_identical(tmp_path, uninterrupted, must_exit):
    out = tmp_path / "run"
    inc = tmp_path / "run.incomplete"
    args = [a for s in STATEFUL for a in ("--set", s)]
    proc = subprocess.Popen(
        [FEDSIM_BIN, "run", CHURN, *args, "--out", str(out), "-q"],
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    tree: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            done = _checkpoint_round(inc)
            if done is not None and done >= 3:
                break
            time.sleep(0.01)
        assert proc.poll() is None, f"the run ended before round 3: {proc.stderr.read()}"
        tree = psutil.Process(proc.pid).children(recursive=True)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    killed_at = time.monotonic()
    # The driver's Ray (GCS, raylet) and the workers die with it at once.
    core = [p for p in tree if "Agent" not in _name(p)]
    assert not _wait_gone(core, timeout=30), [_name(p) for p in core]
    # A visible folder, resumable from its last checkpoint.
    done = _checkpoint_round(inc)
    assert not out.exists() and inc.is_dir() and done is not None and 3 <= done < 6
    res = subprocess.run(
        [FEDSIM_BIN, "run", "--resume", str(out), "-q"],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr
    assert not inc.exists()
    _same_run(out, uninterrupted)
    # Ray's two agents try for 60 s to tell the dead GCS that their raylet died, then
    # exit: after that, nothing of the killed run is left (checked at the session's end).
    must_exit("the killed run's processes", tree, killed_at + 90)
    assert json.loads((out / "summary.json").read_text())["resumed_after_round"] == done


def test_kill_9_of_a_worker_fails_only_its_clients(tmp_path):
    out = tmp_path / "run"
    # Two workers, every client every round; long enough rounds to land in one.
    over = [
        "run.rounds=8",
        "data.num_clients=8",
        "client.epochs=20",
        "simulation.num_workers=2",
    ]
    args = [a for s in over for a in ("--set", s)]
    proc = subprocess.Popen(
        [FEDSIM_BIN, "run", *args, "--out", str(out), "-q"],
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    metrics = out.with_name("run.incomplete") / "metrics.jsonl"
    killed = None
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None and killed is None:
            lines = metrics.read_text().splitlines() if metrics.exists() else []
            if len(lines) >= 2:  # rounds 1 and 2 recorded; round 3 or 4 is training
                workers = [
                    p
                    for p in psutil.Process(proc.pid).children(recursive=True)
                    if "ClientWorker" in " ".join(p.cmdline())
                ]
                if workers:
                    killed = min(workers, key=lambda p: p.pid)
                    killed.send_signal(signal.SIGKILL)
            time.sleep(0.02)
        assert killed is not None, "no worker to kill"
        rc = proc.wait(timeout=600)
        assert rc == 0, proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    records = read_metrics(out)
    assert [r["round"] for r in records] == list(range(1, 9))
    failed = [r["clients_failed"] for r in records]
    # The killed worker's clients failed in the round it died in (and only they: the
    # other worker's clients were aggregated); the replacement serves every later round.
    hit = [i for i, f in enumerate(failed) if f]
    assert hit, failed
    assert all(0 < failed[i] < 8 for i in hit)
    assert all(r["clients_aggregated"] == 8 for r in records[hit[-1] + 1 :])
    assert hit[-1] < 7
