"""Final accuracy of robust aggregation rules under attack, as a table and a plot.

    python examples/robustness/run.py --out runs/robustness

Runs ``scenario.toml`` (next to this file) for every strategy x attack below, with 20%
of the clients malicious (the same 4 of 20 in every arm, drawn from the seed), on
fedsim's engine; writes ``results.csv``, ``results.md`` (the table the README quotes)
and ``results.png`` into ``--out``, with each arm's run folder under it. The Krum family
is told the true number of attackers (f = 4), Multi-Krum averages the n - f = 16 best
scored models; the trimmed mean trims 20% at each end.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
STRATEGIES = {
    "fedavg": [],
    "fedmedian": [],
    "fedtrimmedavg": ["strategy.beta=0.2"],
    "krum": ["strategy.num_malicious_nodes=4"],
    "multikrum": ["strategy.num_malicious_nodes=4", "strategy.num_nodes_to_select=16"],
    "bulyan": ["strategy.num_malicious_nodes=4"],
}
ATTACKS = {
    "none": [],
    "sign_flip": ["attack.kind=sign_flip", "attack.fraction=0.2"],
    "scale": ["attack.kind=scale", "attack.fraction=0.2"],
    "alie": ["attack.kind=alie", "attack.fraction=0.2"],
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("runs/robustness"))
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args(argv)

    from fedsim.engine.ray_runtime import start_ray, stop_ray
    from fedsim.errors import ScenarioError
    from fedsim.results import read_metrics
    from fedsim.runner import execute
    from fedsim.scenario import load_scenario

    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    started, _ = start_ray()  # one Ray for every arm
    try:
        for strategy, s_sets in STRATEGIES.items():
            for attack, a_sets in ATTACKS.items():
                sets = [f"strategy.name={strategy}", *s_sets, *a_sets, *args.overrides]
                run_dir = args.out / f"{strategy}-{attack}"
                try:
                    scn = load_scenario(HERE / "scenario.toml", sets)
                    execute(scn, out=run_dir)
                except ScenarioError as exc:
                    print(f"error: {exc}", file=sys.stderr)
                    return 2
                last = read_metrics(run_dir)[-1]
                rows.append((strategy, attack, last["eval_accuracy"]))
                print(f"{strategy:>14} {attack:>10}  accuracy {last['eval_accuracy']:.4f}")
    finally:
        stop_ray(started)
    _write(rows, args.out)
    return 0


def _write(rows: list[tuple[str, str, float]], out: Path) -> None:
    with (out / "results.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["strategy", "attack", "final_eval_accuracy"])
        w.writerows(rows)
    acc = {(s, a): v for s, a, v in rows}
    lines = [
        "| strategy | " + " | ".join(ATTACKS) + " |",
        "|---|" + "---:|" * len(ATTACKS),
    ]
    for s in STRATEGIES:
        lines.append(f"| {s} | " + " | ".join(f"{acc[s, a]:.3f}" for a in ATTACKS) + " |")
    (out / "results.md").write_text("\n".join(lines) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / len(ATTACKS)
    for i, a in enumerate(ATTACKS):
        xs = [j + (i - (len(ATTACKS) - 1) / 2) * width for j in range(len(STRATEGIES))]
        ax.bar(xs, [acc[s, a] for s in STRATEGIES], width, label=a)
    ax.set_xticks(range(len(STRATEGIES)), list(STRATEGIES))
    ax.set_ylabel("final test accuracy")
    ax.set_ylim(0, 1)
    ax.legend(
        title="attack (20% of clients)",
        ncols=len(ATTACKS),
        fontsize=8,
        loc="lower center",
        bbox_to_anchor=(0.5, 1.0),
        frameon=False,
    )
    fig.tight_layout()
    fig.savefig(out / "results.png", dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
