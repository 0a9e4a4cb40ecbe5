"""A client's persistent state (Flower's ``Context.state``) survives between the rounds it
takes part in, on both engines, whichever worker runs it; evaluation reads it but does
not change it."""

from __future__ import annotations

import csv
import json
import textwrap
from collections import defaultdict

import pytest

from fedsim.results import read_metrics
from fedsim.runner import execute
from fedsim.scenario import load_scenario

COUNTER_PLUGIN = """
    from typing import Literal

    from flwr.app import ConfigRecord

    from clients.behaviour import Outcome, SgdClient
    from fedsim.client_params import CLIENTS


    @CLIENTS.register("counter")
    class CounterClient(SgdClient):
        '''Local SGD that counts its own training rounds in its persistent state.'''

        behaviour: Literal["counter"] = "counter"

        def train(self, task):
            out = super().train(task)
            seen = task.state.get("counter", ConfigRecord({"n": 0}))
            n = int(seen["n"]) + 1
            task.state["counter"] = ConfigRecord({"n": n, "last": task.server_round})
            return Outcome(out.num_examples, {"train_loss": float(n)})

        def evaluate(self, task):
            # Evaluation sees the count, and may not change it.
            n = int(task.state["counter"]["n"]) if "counter" in task.state else 0
            task.state["counter"] = ConfigRecord({"n": 1000, "last": -1})
            out = super().evaluate(task)
            return Outcome(out.num_examples, {**out.metrics, "count_seen": float(n)})
"""


@pytest.fixture(scope="module")
def counter_plugin(tmp_path_factory):
    path = tmp_path_factory.mktemp("plugin") / "counter.py"
    path.write_text(textwrap.dedent(COUNTER_PLUGIN))
    return path


def _scenario(plugin, engine, strategy="fedavg"):
    return load_scenario(
        None,
        [
            f"run.plugins=['{plugin}']",
            "run.rounds=4",
            "data.num_clients=6",
            "model.hidden=[8]",
            "client.behaviour=counter",
            "client.epochs=1",
            f"strategy.name={strategy}",
            "strategy.clients_per_round=3",
            "strategy.evaluate_trained_clients=true",
            f"simulation.engine={engine}",
        ],
    )


def _expected_counts(out):
    """Per round, the example-weighted mean of the aggregated clients' training counts."""
    sizes = {
        c["client_id"]: c["train_size"]
        for c in json.loads((out / "partitions.json").read_text())["clients"]
    }
    rows = list(csv.DictReader((out / "participation.csv").open()))
    count: dict[int, int] = defaultdict(int)
    expected = []
    for rnd in sorted({int(r["round"]) for r in rows}):
        trained = [
            int(r["client_id"])
            for r in rows
            if int(r["round"]) == rnd and r["status"] == "aggregated"
        ]
        for c in trained:
            count[c] += 1
        total = sum(sizes[c] for c in trained)
        expected.append(sum(count[c] * sizes[c] for c in trained) / total)
    return expected


@pytest.mark.parametrize(
    ("engine", "strategy"),
    [("fedsim", "fedavg"), ("fedsim", "fedmedian"), ("flower", "fedavg")],
)
def test_a_counter_client_counts_its_own_rounds(
    tmp_path, ray_cluster, counter_plugin, engine, strategy
):
    res = execute(_scenario(counter_plugin, engine, strategy), out=tmp_path / "run")
    records = read_metrics(res.out_dir)
    got = [r["train_loss"] for r in records]
    expected = _expected_counts(res.out_dir)
    # A client that trains again continues from its own count: the mean grows past 1.
    assert got == pytest.approx(expected, rel=1e-9)
    assert max(expected) > 1.5
    # (Had an evaluation stored its 1000, the next training would report 1001.)


def test_clients_without_state_send_none(tmp_path, ray_cluster):
    # Plain SGD clients keep no state: the pool holds nothing for them after a run.
    from fedsim.engine.pool import WorkerPool

    seen = []
    original = WorkerPool.shutdown

    def spy(self):
        seen.append(dict(self.states))
        original(self)

    WorkerPool.shutdown = spy
    try:
        execute(
            load_scenario(None, ["run.rounds=2", "data.num_clients=4", "model.hidden=[8]"]),
            out=tmp_path / "r",
        )
    finally:
        WorkerPool.shutdown = original
    assert seen == [{}]
