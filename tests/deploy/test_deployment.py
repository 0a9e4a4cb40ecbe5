"""A real deployment across hosts: ``fedsim run`` with simulation.engine = "deployment"
on the SuperLink's host, ``fedsim node`` on three client hosts (network namespaces
joined by veth links where the machine allows, else loopback: the run's header says
which), TLS and SuperNode authentication on.

Checked: the deployment's model equals the simulation's (same seed, same partitions);
a reply over ``coordinator.max_reply_bytes`` is refused by the SuperLink as it arrives;
replies that fail validation (a NaN, a negative example count) are rejected with the
same reasons and leave the same model as in simulation;
a node with an unregistered key, and one that does not trust the SuperLink's
certificate, are refused with one line on each side while the run goes on; a client
host killed mid-run fails only its own replies (dropped, the round completes with the
others within the round timeout) and takes part again once it comes back; nothing the
test started is left. Nodes on data folders of their own (the partitions, exported)
give the simulation's model too; a client host cut off the network for longer than a
round's timeout drops only its own replies and takes part again once it is back; Ctrl-C
of the coordinator and SIGTERM of a node stop every process each started (the stopped
run names the SuperLink's log it keeps).
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from fedsim.deploy.credentials import make_credentials
from fedsim.runner import execute
from fedsim.scenario import default_scenario_path, load_scenario

from .conftest import Hosts, fedsim, wait_for

NODES = 3
# Rounds after the host's death must outlast its ~60 s heartbeat lapse and its rejoin:
# the first few wait out round_timeout_s (10 s a phase), the rest take 1-3 s each.
ROUNDS_B = 30
ROUNDS_E, CUT_S = 6, 8.0  # (the cut outlasts a round's 6 s timeout, not the node's 15 s wait)
BASE = ["data.num_clients=3", "run.seed=7"]
FAULTY_PLUGIN = Path(__file__).resolve().parents[1] / "plugins" / "faulty.py"
SLOW = [  # node 1 trains 12 s longer in round 2, past the phase's 8 s timeout (a round
    # takes 1-5 s here; with a 3 s timeout, once, all three nodes missed round 1 while
    # they loaded the scenario, and a 5.4 s round would have dropped a node that was
    # not slow)
    "run.rounds=6",
    f"run.plugins=['{Path(__file__).resolve().parents[1] / 'plugins' / 'slow.py'}']",
    "client.behaviour=slow",
    "client.delay_s=12",
    "deployment.round_timeout_s=8",
]
FAULTY = [  # node 0 replies a NaN, node 1 a negative example count, node 2 is honest
    "run.rounds=2",
    f"run.plugins=['{FAULTY_PLUGIN}']",
    "client.behaviour=faulty",
    'client.faults={ 0 = "nan", 1 = "negative" }',
]


def _rows(run: Path) -> list[dict[str, str]]:
    with (run / "participation.csv").open() as f:
        return list(csv.DictReader(f))


def _sets(args: list[str]) -> list[str]:
    return [x for a in args for x in ("--set", a)]


@pytest.fixture(scope="module")
def deployed(tmp_path_factory, _ray_session):
    work = tmp_path_factory.mktemp("deploy")
    out: dict = {}
    with Hosts(NODES + 1, work) as hosts:  # (the last host: the intruders')
        out["mode"] = hosts.mode
        creds = make_credentials(work / "creds", hosts=[hosts.link_ip], nodes=NODES)
        other = make_credentials(work / "other", hosts=[hosts.link_ip], nodes=1)
        fleet = f"{hosts.link_ip}:{9092 if hosts.netns else _port()}"
        deploy = [
            "simulation.engine=deployment",
            f"deployment.credentials={creds.root}",
            f"deployment.fleet_address={fleet}",
            "deployment.wait_for_nodes_s=120",
        ]

        def node(name: str, host: int, k: int, key: Path, ca: Path, rejoin: float = 90, data=None):
            args = ["--data", str(data)] if data is not None else []
            return hosts.spawn(
                name,
                host,
                fedsim(
                    "node",
                    "--superlink",
                    fleet,
                    "--partition-id",
                    str(k),
                    "--root-certificates",
                    str(ca),
                    "--key",
                    str(key),
                    "--rejoin-wait",
                    str(rejoin),
                    *args,
                ),
            )

        def run(name: str, sets: list[str]):
            """``fedsim run`` of phase ``name`` on the SuperLink's host, into work/name."""
            argv = fedsim("run", *_sets([*BASE, *sets]), "--out", str(work / name))
            return hosts.spawn(f"{name}-run", None, argv)

        def finish(name: str, proc, timeout_s: float = 300) -> None:
            """Wait for phase ``name``'s run; keep its exit code, folder and log."""
            out[f"{name}_rc"] = proc.wait(timeout=timeout_s)
            out[name] = work / name
            out[f"{name}_log"] = hosts.log(f"{name}-run")

        def started(name: str, timeout_s: float = 180) -> Path:
            """The run folder's metrics, once its first round is recorded."""
            metrics = work / f"{name}.incomplete" / "metrics.jsonl"
            wait_for(lambda: metrics.is_file() and metrics.read_text().strip(), timeout_s, name)
            return metrics

        # 1. A clean run, compared with its simulation.
        for k in range(NODES):
            node(f"a-node{k}", k, k, creds.node_key(k), creds.ca)
        finish("a", run("a", ["run.rounds=2", *deploy]))
        for k in range(NODES):
            hosts.stop(f"a-node{k}")

        # 2. A client host dies after round 1 and comes back (Flower lets a node with
        # the same key in again once the dead one's heartbeats lapse, about 60 s).
        for k in range(NODES):
            node(f"b-node{k}", k, k, creds.node_key(k), creds.ca)
        run_b = run("b", [f"run.rounds={ROUNDS_B}", *deploy, "deployment.round_timeout_s=10"])
        metrics = started("b")
        out["killed_after"] = len(metrics.read_text().splitlines())
        hosts.crash("b-node2", 2)
        node("b-node2-again", 2, 2, creds.node_key(2), creds.ca, rejoin=180)
        # ... and intruders knock meanwhile (this run's SuperLink is up for a minute or
        # more: a clean-clone CI once saw run 1 end before the intruders, started as it
        # began, had dialled, and they waited for a SuperLink for ever).
        unregistered = node("intruder-key", NODES, 0, other.node_key(0), creds.ca, rejoin=0)
        wrong_ca = node("intruder-ca", NODES, 1, creds.node_key(1), other.ca, rejoin=0)
        out["unregistered_rc"] = unregistered.wait(timeout=120)
        out["wrong_ca_rc"] = wrong_ca.wait(timeout=120)
        out["intruder_key_log"] = hosts.log("intruder-key")
        out["intruder_ca_log"] = hosts.log("intruder-ca")
        finish("b", run_b, timeout_s=400)

        # 3. The same nodes (they wait for the next run), replies over a 1 KiB limit.
        finish("c", run("c", ["run.rounds=1", *deploy, "coordinator.max_reply_bytes=1024"]))
        # ... and replies that fail validation (a NaN, a negative example count).
        finish("c2", run("c2", [*FAULTY, *deploy]))
        for name in ("b-node0", "b-node1", "b-node2-again"):
            hosts.stop(name)

        # 4. Nodes on folders of their own (the scenario's partitions, exported): the
        # model is still the simulation's.
        parts = work / "parts"
        scenario = str(default_scenario_path())
        exported = subprocess.run(
            fedsim("export", scenario, str(parts), *_sets(BASE)), capture_output=True, timeout=120
        )
        assert exported.returncode == 0, exported.stderr
        for k in range(NODES):
            node(f"d-node{k}", k, k, creds.node_key(k), creds.ca, data=parts / f"client-{k}")
        local = [*deploy, "deployment.client_data=local", "coordinator.max_examples=100000"]
        finish("d", run("d", ["run.rounds=2", *local]))
        # ... and a node whose reply comes after the round timeout (and its message's
        # time to live): it misses that round, not the rest of the run.
        finish("d2", run("d2", [*SLOW, *local]))

        # 5. A client host loses the network for a while (its link down) mid-run.
        run_e = run("e", [f"run.rounds={ROUNDS_E}", *local, "deployment.round_timeout_s=6"])
        out["cut_after"] = len(started("e").read_text().splitlines())
        hosts.cut("d-node1", 1)
        time.sleep(CUT_S)
        hosts.mend("d-node1", 1)
        out["e_node1_stacks"] = _stacks_if_idle(hosts, "d-node1", run_e, after_s=30)
        finish("e", run_e)

        # 6. Ctrl-C in the coordinator's terminal (SIGINT to its process group), then
        # SIGTERM to a node: each stops every process it started.
        run_f = run("f", ["run.rounds=500", *local])
        started("f")
        out["superlink_before"] = hosts.running("fedsim.deploy.fleet")
        os.killpg(run_f.pid, signal.SIGINT)
        finish("f", run_f, timeout_s=60)
        out["superlink_after"] = hosts.running("fedsim.deploy.fleet")
        kept = re.search(r"the SuperLink's log is kept at (\S+)", out["f_log"])
        out["f_superlink_log"] = kept and Path(kept[1]).is_file()
        if kept:  # (a stopped run keeps it for its user; this test removes it)
            shutil.rmtree(Path(kept[1]).parent)
        out["f_incomplete"] = (work / "f.incomplete").is_dir() and not (work / "f").exists()
        out["node0_before"] = hosts.running("client-0")
        hosts.procs["d-node0"].send_signal(signal.SIGTERM)
        out["node0_rc"] = hosts.procs["d-node0"].wait(timeout=60)
        wait_for(lambda: not hosts.running("client-0"), 30, "node 0's SuperNode to end")
        out["node0_after"] = hosts.running("client-0")
    out["leftovers"] = hosts.leftovers()
    out["sim"] = execute(load_scenario(None, [*BASE, "run.rounds=2"]), out=work / "sim").out_dir
    out["c2_sim"] = execute(load_scenario(None, [*BASE, *FAULTY]), out=work / "c2-sim").out_dir
    return out


def _stacks_if_idle(hosts: Hosts, name: str, run, after_s: float) -> str:
    """If node ``name`` takes no message for ``after_s`` while ``run`` goes on, its
    SuperNode's thread stacks (SIGUSR1, fedsim.deploy.supernode): what it waits on."""
    seen = len(hosts.log(name))
    deadline = time.monotonic() + after_s
    while run.poll() is None and time.monotonic() < deadline:
        if "Receiving" in hosts.log(name)[seen:]:
            return ""
        time.sleep(0.5)
    if run.poll() is not None:
        return ""
    # (its own SuperNode: the one in the process group of the node started as ``name``)
    pids = []
    for pid in hosts.running("fedsim.deploy.supernode"):
        with contextlib.suppress(ProcessLookupError):
            if os.getpgid(pid) == hosts.procs[name].pid:
                os.kill(pid, signal.SIGUSR1)
                pids.append(pid)
    time.sleep(2)
    return (
        f"SuperNode {pids} took no message {after_s:.0f} s after the mend:\n"
        + hosts.log(name)[seen:][-6000:]
    )


def _port() -> int:
    from fedsim.deploy.processes import free_port

    return free_port()


def test_the_deployment_gives_the_simulations_model(deployed):
    print(f"deployment test network: {deployed['mode']}")
    assert deployed["a_rc"] == 0, deployed["a_log"][-2000:]
    a = json.loads((deployed["a"] / "summary.json").read_text())
    sim = json.loads((deployed["sim"] / "summary.json").read_text())
    assert a["model_sha256"] == sim["model_sha256"]
    assert sorted(p.name for p in deployed["a"].iterdir()) == sorted(
        p.name for p in deployed["sim"].iterdir()
    )
    assert {r["status"] for r in _rows(deployed["a"])} == {"aggregated"}


def test_a_node_with_an_unregistered_key_is_refused(deployed):
    assert deployed["unregistered_rc"] == 1
    assert (
        "fedsim node: the SuperLink refused this node: its public key is not registered"
        in (deployed["intruder_key_log"])
    )
    assert "the SuperLink refused a node: its public key is not registered" in deployed["b_log"]


def test_a_node_that_does_not_trust_the_superlinks_certificate_is_refused(deployed):
    assert deployed["wrong_ca_rc"] == 1
    assert "does not verify against --root-certificates" in deployed["intruder_ca_log"]


def test_a_killed_node_drops_only_its_own_replies_and_comes_back(deployed):
    assert deployed["b_rc"] == 0, deployed["b_log"][-2000:]
    rows = _rows(deployed["b"])
    assert len(rows) == ROUNDS_B * NODES
    status = {(int(r["round"]), int(r["client_id"])): r["status"] for r in rows}
    # The host died while round k + 1 ran (k rounds recorded), or just before k + 2
    # started (a fast round may have finished in between).
    k = deployed["killed_after"]
    dead = [r for r in range(k + 1, ROUNDS_B + 1) if status[(r, 2)] == "dropped"]
    assert dead and dead[0] <= k + 2, rows
    assert all(status[(r, 2)] == "aggregated" for r in range(1, k + 1))
    assert all(status[(r, c)] == "aggregated" for r in range(1, ROUNDS_B + 1) for c in (0, 1))
    back = [r for r in range(dead[0] + 1, ROUNDS_B + 1) if status[(r, 2)] == "aggregated"]
    assert back, f"node 2 never came back: {rows}"
    metrics = [json.loads(x) for x in (deployed["b"] / "metrics.jsonl").read_text().splitlines()]
    assert [m["round"] for m in metrics] == list(range(1, ROUNDS_B + 1))


def test_a_reply_over_the_limit_is_refused_as_it_arrives(deployed):
    # (by the SuperLink, as the node pushes it: the coordinator never pulls it)
    assert deployed["c_rc"] == 0, deployed["c_log"][-2000:]
    statuses = {r["status"] for r in _rows(deployed["c"])}
    assert statuses == {"rejected:reply exceeds the limit of 1024 bytes (refused at the SuperLink)"}
    (m,) = [json.loads(x) for x in (deployed["c"] / "metrics.jsonl").read_text().splitlines()]
    assert m["clients_rejected"] == NODES and m["round_skipped"] is True


def test_replies_that_fail_validation_are_rejected_as_in_simulation(deployed):
    assert deployed["c2_rc"] == 0, deployed["c2_log"][-2000:]
    rows, sim = _rows(deployed["c2"]), _rows(deployed["c2_sim"])
    status = {(r["round"], r["client_id"]): r["status"] for r in rows}
    for rnd in ("1", "2"):
        assert "has non-finite values" in status[(rnd, "0")]
        assert "num-examples -299 is not positive" in status[(rnd, "1")]
        assert status[(rnd, "2")] == "aggregated"
    assert status == {(r["round"], r["client_id"]): r["status"] for r in sim}
    summaries = [
        json.loads((d / "summary.json").read_text()) for d in (deployed["c2"], deployed["c2_sim"])
    ]
    assert summaries[0]["model_sha256"] == summaries[1]["model_sha256"]


def test_nodes_on_their_own_data_folders_give_the_simulations_model(deployed):
    assert deployed["d_rc"] == 0, deployed["d_log"][-2000:]
    d = json.loads((deployed["d"] / "summary.json").read_text())
    sim = json.loads((deployed["sim"] / "summary.json").read_text())
    assert d["model_sha256"] == sim["model_sha256"]
    assert {r["status"] for r in _rows(deployed["d"])} == {"aggregated"}


def test_a_reply_after_the_round_timeout_costs_its_node_that_round_only(deployed):
    assert deployed["d2_rc"] == 0, deployed["d2_log"][-2000:]
    status = {(int(r["round"]), int(r["client_id"])): r["status"] for r in _rows(deployed["d2"])}
    assert status[(2, 1)] == "dropped", status
    # The late reply is let go by the SuperLink, or by the SuperNode before node 1 has
    # handed all of it over (a race, about half the time here; before the fix that way
    # cost the node the rest of the run: tests/deploy/test_executor.py makes it every
    # time). Round 3's message may expire while node 1 still trains round 2; from round
    # 4 on it takes part again.
    assert all(status[(r, 1)] == "aggregated" for r in range(4, 7)), status
    assert all(status[(r, c)] == "aggregated" for r in range(2, 7) for c in (0, 2)), status


def test_a_node_cut_off_the_network_drops_only_its_replies_and_reconnects(deployed):
    assert deployed["e_rc"] == 0, deployed["e_log"][-2000:]
    status = {(int(r["round"]), int(r["client_id"])): r["status"] for r in _rows(deployed["e"])}
    k = deployed["cut_after"]
    assert all(status[(r, 1)] == "aggregated" for r in range(1, k + 1))
    cut = [r for r in range(k + 1, ROUNDS_E + 1) if status[(r, 1)] == "dropped"]
    assert cut and cut[0] <= k + 2, status
    back = [r for r in range(cut[-1] + 1, ROUNDS_E + 1) if status[(r, 1)] == "aggregated"]
    assert back, f"node 1 never came back: {status}\n{deployed['e_node1_stacks']}"
    assert all(status[(r, c)] == "aggregated" for r in range(1, ROUNDS_E + 1) for c in (0, 2))


def test_ctrl_c_stops_the_run_and_its_superlink(deployed):
    assert deployed["superlink_before"], "no SuperLink was running"
    assert deployed["f_rc"] == 130, deployed["f_log"][-2000:]
    assert deployed["superlink_after"] == []
    assert deployed["f_incomplete"]  # (the folder says the run did not finish)
    assert "fedsim: interrupted" in deployed["f_log"]
    assert deployed["f_superlink_log"]  # (kept, and named on stderr)


def test_sigterm_stops_a_node_and_its_supernode(deployed):
    assert len(deployed["node0_before"]) >= 2  # fedsim node and its flower-supernode
    assert deployed["node0_rc"] == 0
    assert deployed["node0_after"] == []


def test_nothing_the_test_started_is_left(deployed):
    assert deployed["leftovers"] == []
