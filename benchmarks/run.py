"""Side-by-side performance harness: ``python -m benchmarks.run [--quick] [--json PATH]``.

Every measurement runs in a fresh process (``benchmarks.contender``), so Ray start,
first-round latency and memory are those a user sees. Contenders alternate within each
repetition (pure, fedsim, flower, pure, fedsim, ...), so drift in the machine's speed
hits all of them alike. Reported numbers are medians over repetitions.

Memory is the peak PSS (proportional set size: shared pages divided among the
processes sharing them) summed over the whole process tree, i.e. the driver plus Ray's
GCS, raylet and every worker, read from /proc so that the sampler barely loads the 2
cores it measures (see ``MemorySampler``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from benchmarks.workloads import FULL, QUICK, WORKLOADS

PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024

TARGETS = {
    "tiny fedsim/ideal <= 1.5": ("tiny-100of1k", "fedsim_over_ideal", "<=", 1.5),
    "tiny flower/fedsim >= 8": ("tiny-100of1k", "flower_over_fedsim", ">=", 8.0),
    "cnn fedsim/ideal <= 1.1": ("cnn", "fedsim_over_ideal", "<=", 1.1),
    "fixed cost per round <= 20 ms": ("derived", "fixed_ms_per_round", "<=", 20.0),
    "first round <= 2x steady": ("tiny-100of1k", "fedsim_first_over_steady", "<=", 2.0),
    "1M population round within 15%": ("derived", "population_1M_over_1k", "<=", 1.15),
    "dormant client <= 1 KB on driver": ("derived", "dormant_bytes_per_client", "<=", 1024.0),
    "tiny peak tree memory <= 1.6 GB": ("tiny-100of1k", "fedsim_peak_tree_mb", "<=", 1600.0),
    "central DP adds <= 5% to tiny": ("derived", "dp_over_tiny", "<=", 1.05),
    "DP-SGD mlp round <= 2.5x mlp": ("derived", "dpsgd_over_mlp", "<=", 2.5),
}


# ----------------------------------------------------------------------------- memory


def _children_map() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as fh:
                stat = fh.read()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        kids.setdefault(ppid, []).append(int(entry))
    return kids


def _pss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _tree(root: int) -> list[int]:
    kids, out, todo = _children_map(), [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(kids.get(pid, []))
    return out


def _rss_kb(pid: int) -> int:
    """Resident set size from /proc/PID/statm: O(1), no page-table walk."""
    try:
        with open(f"/proc/{pid}/statm", encoding="ascii") as fh:
            return int(fh.read().split()[1]) * PAGE_KB
    except (OSError, IndexError, ValueError):
        return 0


class MemorySampler(threading.Thread):
    """Peak PSS of a process tree, sampled without slowing down what it measures.

    PSS walks every page table of the tree: about 40 ms of CPU per pass over a Ray tree
    (driver, raylet, workers all map the object store), which would take ~4% of a core
    from the very run being timed, more from fedsim's many processes than from the
    single pure loop. So the tree's RSS (O(1) per process) is read every ``interval``,
    and PSS only when that RSS is 1% above its highest so far (the tree's PSS cannot
    grow without its RSS growing), and at least every ``pss_every`` seconds.
    """

    def __init__(self, pid: int, interval: float = 1.0, pss_every: float = 10.0) -> None:
        super().__init__(daemon=True)
        self.pid, self.interval, self.pss_every = pid, interval, pss_every
        self.peak_tree_kb = self.peak_driver_kb = 0
        self.pss_samples = 0
        self._halt = threading.Event()

    def run(self) -> None:
        rss_peak, last_pss = 0, 0.0
        while not self._halt.is_set():
            pids = _tree(self.pid)
            rss = sum(_rss_kb(p) for p in pids)
            now = time.monotonic()
            if rss > rss_peak * 1.01 or now - last_pss >= self.pss_every:
                rss_peak, last_pss = max(rss, rss_peak), now
                pss = {p: _pss_kb(p) for p in pids}
                self.pss_samples += 1
                self.peak_tree_kb = max(self.peak_tree_kb, sum(pss.values()))
                self.peak_driver_kb = max(self.peak_driver_kb, pss.get(self.pid, 0))
            self._halt.wait(self.interval)

    def stop(self) -> None:
        self._halt.set()
        self.join()


# ------------------------------------------------------------------------ measuring


def measure(workload: str, contender: str, rounds: int) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "benchmarks.contender", workload, contender, f"--rounds={rounds}"]
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "PYTHONUNBUFFERED": "1"}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    sampler = MemorySampler(proc.pid)
    sampler.start()
    out, err = proc.communicate()
    sampler.stop()
    wall = time.perf_counter() - t0
    line = next((ln for ln in out.splitlines() if ln.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(f"{workload}/{contender} failed ({proc.returncode}): {err[-2000:]}")
    res = json.loads(line.removeprefix("RESULT "))
    res.update(
        steady_s=statistics.median(steady_rounds(res["round_s"])),
        first_s=res["round_s"][0],
        last_s=res["round_s"][-1],
        wall_s=wall,
        peak_tree_mb=sampler.peak_tree_kb / 1024,
        peak_driver_mb=sampler.peak_driver_kb / 1024,
    )
    return res


def steady_rounds(round_s: list[float]) -> list[float]:
    """The rounds of a run that measure its steady state: all but the first and the
    last. fedsim's first round fills the pipeline (it starts on idle workers) and its
    last drains it: its wall time runs to the end of its evaluation, which every other
    round overlaps with the next round's training (``Coordinator._close``), so it holds
    one more evaluation phase than a period of the pipeline (tiny: 125-141 ms against
    ~93). Both are once per run, like Ray's start; the pure loops have no such rounds,
    and leaving out their first and last changes nothing for them. Runs of fewer than
    4 rounds keep everything after the first."""
    inner = round_s[1:-1] if len(round_s) >= 4 else round_s[1:]
    return inner or round_s


def _median(runs: list[dict[str, Any]], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def summarise(workload: str, runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    scn = WORKLOADS[workload].scenario(2)
    k = scn.train_cohort
    row: dict[str, Any] = {
        "workload": workload,
        "clients_per_round": k,
        "population": scn.num_clients,
    }
    for name, rs in runs.items():
        row[f"{name}_steady_s"] = _median(rs, "steady_s")
        row[f"{name}_ms_per_client_round"] = 1000 * row[f"{name}_steady_s"] / k
        row[f"{name}_first_s"] = _median(rs, "first_s")
        row[f"{name}_first_over_steady"] = row[f"{name}_first_s"] / row[f"{name}_steady_s"]
        if all("last_s" in r for r in rs):
            row[f"{name}_last_s"] = _median(rs, "last_s")
        row[f"{name}_ray_start_s"] = _median(rs, "ray_start_s")
        row[f"{name}_peak_tree_mb"] = _median(rs, "peak_tree_mb")
        row[f"{name}_peak_driver_mb"] = _median(rs, "peak_driver_mb")
        row[f"{name}_runs"] = len(rs)
    # A ratio is the median over repetitions of the ratio within each: a repetition's
    # contenders run next to each other, so a slow spell of the machine (fedsim's round
    # times varied by 20% from one run to the next here) weighs on both sides of it.
    if "pure" in runs and "fedsim" in runs:
        workers = max(1, int(_median(runs["fedsim"], "workers")))
        row["workers"] = workers
        row["ideal_s"] = row["pure_steady_s"] / workers
        row["fedsim_over_ideal"] = _ratio(runs["fedsim"], runs["pure"]) * workers
    if "pure2" in runs and "fedsim" in runs:
        row["floor_s"] = row["pure2_steady_s"]
        row["fedsim_over_floor"] = _ratio(runs["fedsim"], runs["pure2"])
        if "pure" in runs:
            row["floor_over_ideal"] = _ratio(runs["pure2"], runs["pure"]) * row["workers"]
    if "flower" in runs and "fedsim" in runs:
        row["flower_over_fedsim"] = _ratio(runs["flower"], runs["fedsim"])
    return row


def _ratio(top: list[dict[str, Any]], bottom: list[dict[str, Any]]) -> float:
    """The median over repetitions of ``top``'s steady round time over ``bottom``'s."""
    return statistics.median(
        t["steady_s"] / b["steady_s"] for t, b in zip(top, bottom, strict=True)
    )


def paired_ratio(raw: dict[str, dict[str, list[dict[str, Any]]]], name: str) -> float | None:
    """Median over repetitions of ``name``'s fedsim round time over its base's, each
    repetition's pair measured side by side (see ``schedule``)."""
    base = WORKLOADS[name].base
    runs, base_runs = raw.get(name, {}).get("fedsim"), raw.get(base or "", {}).get("fedsim")
    if not runs or not base_runs:
        return None
    return _ratio(runs, base_runs)


def derive(
    rows: dict[str, dict[str, Any]], raw: dict[str, dict[str, list[dict[str, Any]]]]
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    a = rows.get("tiny-100of1k")
    f = rows.get("fixed")
    if f and "fedsim_steady_s" in f:
        # Round time with 2 one-example clients: the fixed cost (plus that tiny work).
        out["fixed_ms_per_round"] = 1000 * f["fedsim_steady_s"]
    for key, name in (
        ("dp_over_tiny", "tiny-dp"),
        ("dpsgd_over_mlp", "mlp-dpsgd"),
        ("population_1M_over_1k", "tiny-100of1M"),
    ):
        ratio = paired_ratio(raw, name)
        if ratio is not None:
            out[key] = ratio
    m = rows.get("tiny-100of1M")
    if a and m and "fedsim_steady_s" in m:
        extra = (m["fedsim_peak_driver_mb"] - a["fedsim_peak_driver_mb"]) * 2**20
        out["dormant_bytes_per_client"] = max(0.0, extra) / (m["population"] - a["population"])
    return out


def schedule(
    names: list[str], contenders: dict[str, list[str]], reps: int
) -> list[tuple[str, str]]:
    """The order of all measurements: by workload, repetitions in turn, contenders
    alternating within each. A workload with a ``base`` is measured within its base's
    repetitions, its fedsim run next to the base's, the pair's order alternating from
    one repetition to the next (base first, then it first, ...)."""
    deps: dict[str, list[str]] = {}
    for n in names:
        base = WORKLOADS[n].base
        if base in names and "fedsim" in contenders[n] and "fedsim" in contenders[base]:
            deps.setdefault(base, []).append(n)
    paired = {d for ds in deps.values() for d in ds}
    order: list[tuple[str, str]] = []
    for n in names:
        if n in paired:
            continue
        for rep in range(reps):
            if n not in deps:
                order += [(n, c) for c in contenders[n]]
                continue
            order += [(n, c) for c in contenders[n] if c != "fedsim"]
            pair = [(n, "fedsim")] + [(d, "fedsim") for d in deps[n]]
            order += pair if rep % 2 == 0 else pair[::-1]
            for d in deps[n]:  # (a dependent's other contenders, if any)
                order += [(d, c) for c in contenders[d] if c != "fedsim"]
    return order


def check_targets(rows: dict[str, dict[str, Any]], derived: dict[str, Any]) -> dict[str, Any]:
    results = {}
    for label, (where, key, op, bound) in TARGETS.items():
        src = derived if where == "derived" else rows.get(where, {})
        value = src.get(key)
        ok = None if value is None else (value <= bound if op == "<=" else value >= bound)
        results[label] = {"value": value, "ok": ok}
    return results


# ------------------------------------------------------------------------- output


def _fmt(v: Any, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def table(rows: dict[str, dict[str, Any]]) -> str:
    head = (
        f"{'workload':<14}{'K/N':>12}{'contender':>10}{'s/round':>9}{'ms/cl-rd':>9}"
        f"{'1st rd s':>9}{'ray s':>7}{'peak MB':>9}"
    )
    lines = [head, "-" * len(head)]
    for name, r in rows.items():
        kn = f"{r['clients_per_round']}/{r['population']}"
        for c in ("pure", "pure2", "fedsim", "flower"):
            if f"{c}_steady_s" not in r:
                continue
            lines.append(
                f"{name:<14}{kn:>12}{c:>10}{r[f'{c}_steady_s']:>9.3f}"
                f"{r[f'{c}_ms_per_client_round']:>9.2f}{r[f'{c}_first_s']:>9.3f}"
                f"{r[f'{c}_ray_start_s']:>7.2f}{r[f'{c}_peak_tree_mb']:>9.0f}"
            )
        ratios = []
        if "fedsim_over_ideal" in r:
            ratios.append(
                f"ideal {r['ideal_s']:.3f} s ({r['workers']} workers), "
                f"fedsim/ideal {r['fedsim_over_ideal']:.2f}x"
            )
        if "fedsim_over_floor" in r:
            ratios.append(
                f"2 pure loops at once {r['floor_over_ideal']:.2f}x ideal, "
                f"fedsim/that {r['fedsim_over_floor']:.2f}x"
            )
        if "flower_over_fedsim" in r:
            ratios.append(f"flower/fedsim {r['flower_over_fedsim']:.1f}x")
        if ratios:
            lines.append(f"{'':<14}{'':>12}  -> " + "; ".join(ratios))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--quick", action="store_true", help="fewer rounds, 1 repetition, no Flower on 1k cohorts"
    )
    p.add_argument("--json", type=Path, help="write all results to this file")
    p.add_argument("--reps", type=int, help="repetitions (default 3, quick 1)")
    p.add_argument(
        "--rounds",
        type=int,
        help="rounds per run (default 6; tiny-100of1k and the workloads read against it 12, "
        "cnn 10; quick 3 for all)",
    )
    p.add_argument("--workloads", help=f"comma list of {', '.join(WORKLOADS)}")
    p.add_argument("--contenders", default="pure,pure2,fedsim,flower")
    a = p.parse_args(argv)
    reps = a.reps or (1 if a.quick else 3)
    default_rounds = 3 if a.quick else 6
    names = a.workloads.split(",") if a.workloads else list(QUICK if a.quick else FULL)
    unknown = [n for n in names if n not in WORKLOADS]
    if unknown:
        p.error(f"unknown workload(s) {unknown}; known: {', '.join(WORKLOADS)}")
    wanted = set(a.contenders.split(","))
    # --rounds, else --quick's 3, else the workload's own, else 6
    rounds = {
        n: a.rounds
        or (default_rounds if a.quick else WORKLOADS[n].default_rounds() or default_rounds)
        for n in names
    }
    contenders = {n: [c for c in WORKLOADS[n].contenders if c in wanted] for n in names}
    if a.quick and "tiny-1kof1k" in contenders:
        contenders["tiny-1kof1k"] = [c for c in contenders["tiny-1kof1k"] if c != "flower"]
    raw: dict[str, dict[str, list[dict[str, Any]]]] = {
        n: {c: [] for c in contenders[n]} for n in names
    }
    for name, c in schedule(names, contenders, reps):
        rep = len(raw[name][c]) + 1
        print(f"[{name}] {c} run {rep}/{reps} ...", file=sys.stderr, flush=True)
        raw[name][c].append(measure(name, c, rounds[name]))
    rows = {n: summarise(n, r) for n, r in raw.items()}
    derived = derive(rows, raw)
    targets = check_targets(rows, derived)
    print(table(rows))
    print()
    for k, v in derived.items():
        print(f"{k}: {v:.3f}")
    for label, t in targets.items():
        mark = "n/a" if t["ok"] is None else ("PASS" if t["ok"] else "FAIL")
        print(f"[{mark}] {label}: {_fmt(t['value'], '.3f')}")
    if a.json:
        meta = {"argv": sys.argv[1:], "cpus": os.cpu_count(), "reps": reps, "rounds": rounds}
        doc = {"meta": meta, "rows": rows, "derived": derived, "targets": targets, "raw": raw}
        a.json.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
