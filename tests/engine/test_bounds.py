"""Bounded everything: oversized replies are refused where they arrive, the driver's
memory stays flat over a long run, and dead runs' shared-memory folders are cleaned."""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import textwrap

import numpy as np
import psutil
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedsim.engine.claims import OWNER_FILE, SHM_PREFIX, remove_stale
from fedsim.engine.validation import Invalid, ReplyLimits, reply_bytes
from fedsim.progress import Progress
from fedsim.results import read_metrics
from fedsim.runner import execute
from fedsim.scenario import load_scenario


def _content(n_floats: int, metric_list: int = 0) -> RecordDict:
    return RecordDict(
        {
            "arrays": ArrayRecord({"w": Array(np.zeros(n_floats, dtype=np.float32))}),
            "metrics": MetricRecord({"num-examples": 3, "hist": [0.0] * metric_list}),
        }
    )


def test_reply_size_is_counted_from_lengths_and_bounded():
    model = _content(1000)["arrays"]
    ok = _content(1000, metric_list=10)
    assert reply_bytes(ok) >= 4000
    ReplyLimits().check_size(ok, model)  # the default: the model plus 1 MiB
    fat = _content(1000, metric_list=200_000)  # 1.6 MB of "metrics"
    with pytest.raises(Invalid, match="exceeds the limit"):
        ReplyLimits().check_size(fat, model)
    with pytest.raises(Invalid, match="exceeds the limit of 5,000"):
        ReplyLimits(max_reply_bytes=5000).check_size(_content(2000), model)


BLOATED = """
from typing import Literal
from clients.behaviour import Outcome, SgdClient
from fedsim.client_params import CLIENTS

@CLIENTS.register("bloated")
class Bloated(SgdClient):
    behaviour: Literal["bloated"] = "bloated"

    def train(self, task):
        out = super().train(task)
        if task.cid == 1:  # 16 MB of metrics
            return Outcome(out.num_examples, {**out.metrics, "junk": [0.5] * 2_000_000})
        return out
"""


@pytest.fixture(scope="module")
def bloated_plugin(tmp_path_factory):
    # One file for both engines: a plug-in registers its name once per process.
    path = tmp_path_factory.mktemp("plugin") / "bloated.py"
    path.write_text(BLOATED)
    return path


@pytest.mark.parametrize("engine", ["fedsim", "flower"])
def test_an_oversized_reply_is_rejected_for_its_client_only(
    tmp_path, ray_cluster, engine, bloated_plugin
):
    plugin = bloated_plugin
    res = execute(
        load_scenario(
            None,
            [
                f"run.plugins=['{plugin}']",
                "run.rounds=2",
                "data.num_clients=4",
                "model.hidden=[8]",
                "client.behaviour=bloated",
                f"simulation.engine={engine}",
            ],
        ),
        out=tmp_path / "run",
    )
    rows = (res.out_dir / "participation.csv").read_text().splitlines()[1:]
    one = [r for r in rows if r.split(",")[1] == "1"]
    assert all("rejected:reply of" in r and "exceeds the limit" in r for r in one), one
    assert all(r.endswith("aggregated") for r in rows if r.split(",")[1] != "1")
    assert [r["clients_rejected"] for r in read_metrics(res.out_dir)] == [1, 1]


class _Sampler(Progress):
    def __init__(self, rounds: int) -> None:
        super().__init__(rounds, quiet=True)
        self.rss: list[int] = []

    def update(self, rec):
        self.rss.append(psutil.Process().memory_info().rss)


def test_driver_memory_stays_flat_over_200_rounds(tmp_path, ray_cluster):
    sampler = _Sampler(200)
    execute(
        load_scenario(
            None,
            [
                "run.rounds=200",
                "data.num_clients=4",
                "model.hidden=[32]",
                "strategy.name=fedadam",
                "run.checkpoint_every=10",
            ],
        ),
        out=tmp_path / "run",
        progress=sampler,
    )
    rss = np.array(sampler.rss) / 2**20
    assert len(rss) == 200
    # After warm-up (allocator pools, imports), what rounds 50..200 add stays small: a
    # leak of one model copy (~100 KB) per round would add 15 MB.
    growth = np.median(rss[-20:]) - np.median(rss[40:60])
    assert growth < 8, (rss[40:60], rss[-20:])


def test_stale_pool_folders_of_dead_processes_are_removed(tmp_path):
    live = tmp_path / f"{SHM_PREFIX}live"
    dead = tmp_path / f"{SHM_PREFIX}dead"
    for d in (live, dead):
        d.mkdir()
        (d / "0").write_bytes(b"\0" * 8)
    # A live owner holds its lock; a process that held the other one was killed -9.
    fd = os.open(live / OWNER_FILE, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    code = textwrap.dedent(
        f"""
        import fcntl, os, signal
        fd = os.open({str(dead / OWNER_FILE)!r}, os.O_RDWR | os.O_CREAT)
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    subprocess.run([sys.executable, "-c", code], check=False, timeout=60)
    try:
        assert remove_stale(str(tmp_path)) == [str(dead)]
        assert live.exists() and not dead.exists()
    finally:
        os.close(fd)


def test_a_config_record_reply_counts_too():
    c = RecordDict({"config": ConfigRecord({"blob": b"x" * 5000})})
    assert reply_bytes(c) > 5000
