"""Deployment overhead: ``python -m benchmarks.deploy [--nodes 2,8,32] [--json PATH]``.

For each node count N, the tiny workload (bench_tiny.toml: logistic regression, 50
examples per client, one local epoch) with N clients, all N in every round, runs

- simulated: ``fedsim run`` on the fedsim engine (in-process Ray pool);
- deployed: ``fedsim run`` with ``simulation.engine = "deployment"`` on this machine's
  loopback, with the documented set-up (TLS, SuperNode authentication, keys from
  ``fedsim credentials``) and N real ``fedsim node`` processes, each a Flower SuperNode.

Reported per N: the median steady round time of each (rounds after the first), the
deployment's overhead per round (deployed minus simulated), and the messages per
second the coordinator sustained (each round sends N training and N evaluation
instructions and receives as many replies: 4N messages over the round time). The
nodes' summed RSS is reported too (every node loads torch and the data). Repetitions
alternate simulated and deployed runs; medians over them.

Everything runs on this machine's 2 cores, nodes included, so at 32 nodes the nodes'
own work (32 processes polling, training, evaluating) shares the cores with the
coordinator: the overhead measured is an upper bound of what separate machines see.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.run import _rss_kb, _tree
from benchmarks.workloads import BENCH_TINY


def _fedsim(*args: str) -> list[str]:
    return [sys.executable, "-m", "fedsim.cli", *args]


def _sets(pairs: list[str]) -> list[str]:
    return [x for p in pairs for x in ("--set", p)]


def _round_times(run: Path) -> list[float]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [json.loads(x)["round_wall_s"] for x in lines]


def _rss_mb(pids: list[int]) -> float:
    """Summed RSS of the process trees under ``pids``."""
    return sum(_rss_kb(p) for pid in pids for p in _tree(pid)) / 1024


def _free_port() -> int:
    from fedsim.deploy.processes import free_port

    return free_port()


def measure(n: int, rounds: int, reps: int, work: Path) -> dict:
    from fedsim.deploy.credentials import make_credentials

    base = [
        f"data.num_clients={n}",
        f"strategy.clients_per_round={n}",
        f"run.rounds={rounds}",
    ]
    creds = make_credentials(work / f"creds{n}", hosts=["127.0.0.1"], nodes=n)
    port = _free_port()
    deploy = [
        "simulation.engine=deployment",
        f"deployment.credentials={creds.root}",
        f"deployment.fleet_address=127.0.0.1:{port}",
        "deployment.wait_for_nodes_s=600",
    ]
    nodes: list[subprocess.Popen[bytes]] = []
    sim_runs, dep_runs, rss = [], [], []
    try:
        for k in range(n):
            with (work / f"node{n}-{k}.log").open("wb") as log:
                nodes.append(
                    subprocess.Popen(
                        _fedsim(
                            "node",
                            "--superlink",
                            f"127.0.0.1:{port}",
                            "--partition-id",
                            str(k),
                            "--root-certificates",
                            str(creds.ca),
                            "--key",
                            str(creds.node_key(k)),
                        ),
                        stdin=subprocess.DEVNULL,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                    )
                )
        for rep in range(reps):
            for kind in ("sim", "deploy") if rep % 2 == 0 else ("deploy", "sim"):
                out = work / f"{kind}{n}-{rep}"
                sets = base + (deploy if kind == "deploy" else [])
                print(f"[N={n}] {kind} run {rep + 1}/{reps} ...", file=sys.stderr, flush=True)
                r = subprocess.run(
                    _fedsim("run", str(BENCH_TINY), *_sets(sets), "--out", str(out), "-q"),
                    capture_output=True,
                    text=True,
                    timeout=1800,
                )
                if r.returncode != 0:
                    raise RuntimeError(f"N={n} {kind}: {r.stderr[-2000:]}")
                times = _round_times(out)
                steady = statistics.median(times[1:] or times)
                (dep_runs if kind == "deploy" else sim_runs).append(steady)
                if kind == "deploy":
                    rss.append(_rss_mb([p.pid for p in nodes]))
    finally:
        for p in nodes:
            _signal_group(p.pid, signal.SIGTERM)
        deadline = time.monotonic() + 60
        for p in nodes:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=max(1.0, deadline - time.monotonic()))
            _signal_group(p.pid, signal.SIGKILL)
            p.wait()
    sim_s, dep_s = statistics.median(sim_runs), statistics.median(dep_runs)
    return {
        "nodes": n,
        "rounds": rounds,
        "reps": reps,
        "sim_round_s": sim_s,
        "deploy_round_s": dep_s,
        "overhead_ms_per_round": 1000 * (dep_s - sim_s),
        "deploy_over_sim": dep_s / sim_s,
        "messages_per_s": 4 * n / dep_s,
        "nodes_rss_mb": statistics.median(rss),
        "nodes_rss_mb_per_node": statistics.median(rss) / n,
        "raw": {"sim_round_s": sim_runs, "deploy_round_s": dep_runs, "nodes_rss_mb": rss},
    }


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, sig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nodes", default="2,8,32", help="comma list of node counts")
    p.add_argument("--rounds", type=int, default=6, help="rounds per run (default 6)")
    p.add_argument("--reps", type=int, default=3, help="repetitions (default 3)")
    p.add_argument("--json", type=Path, help="write the results to this file")
    p.add_argument("--keep", type=Path, help="work in this (new) folder and keep its logs")
    a = p.parse_args(argv)
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    rows = []
    with tempfile.TemporaryDirectory(prefix="fedsim-deploy-bench-") as tmp:
        work = Path(tmp) if a.keep is None else a.keep
        work.mkdir(parents=True, exist_ok=True)
        for n in (int(x) for x in a.nodes.split(",")):
            rows.append(measure(n, a.rounds, a.reps, work))
    head = f"{'nodes':>6}{'sim s/rd':>10}{'deploy s/rd':>13}{'overhead ms':>13}{'msgs/s':>9}{'node MB':>9}"
    print(head)
    print("-" * len(head))
    for r in rows:
        print(
            f"{r['nodes']:>6}{r['sim_round_s']:>10.3f}{r['deploy_round_s']:>13.3f}"
            f"{r['overhead_ms_per_round']:>13.0f}{r['messages_per_s']:>9.1f}"
            f"{r['nodes_rss_mb_per_node']:>9.0f}"
        )
    if a.json:
        meta = {"argv": sys.argv[1:], "cpus": os.cpu_count()}
        a.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
