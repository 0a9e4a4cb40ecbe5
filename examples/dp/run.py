"""Privacy against utility: central DP-FedAvg on MNIST for several noise multipliers.

    python examples/dp/run.py --out runs/dp

Runs ``scenarios/dp_mnist.toml`` (500 clients, an MLP, Poisson sampling q = 0.1, clip norm 0.5,
100 rounds, RDP at delta = 1e-5) for each noise multiplier below (0: noise off, clipping
only, no guarantee), on fedsim's engine and one Ray; writes ``results.csv``,
``results.md`` (the table the README quotes) and ``results.png`` (epsilon and test
accuracy against rounds) into ``--out``, with each arm's run folder (and its
``privacy.png``) under it. ``--set KEY=VALUE`` applies to every arm.
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCENARIO = ROOT / "scenarios" / "dp_mnist.toml"
NOISE = (0.0, 0.5, 1.0, 2.0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("runs/dp"))
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args(argv)

    from fedsim.engine.ray_runtime import start_ray, stop_ray
    from fedsim.errors import ScenarioError
    from fedsim.results import read_metrics
    from fedsim.runner import execute
    from fedsim.scenario import load_scenario

    arms = {z: args.out / f"z{z:g}" for z in NOISE}
    for d in arms.values():
        if d.exists() or d.with_name(d.name + ".incomplete").exists():
            print(f"error: {d} exists: choose another --out", file=sys.stderr)
            return 2
    try:
        scenarios = {
            z: load_scenario(SCENARIO, [f"privacy.dp.noise_multiplier={z}", *args.overrides])
            for z in NOISE
        }
    except ScenarioError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    curves = {}
    rows = []
    started, _ = start_ray()  # one Ray for every arm
    try:
        for z, scn in scenarios.items():
            res = execute(scn, out=arms[z])
            recs = read_metrics(res.out_dir)
            curves[z] = recs
            s = res.summary
            clipped = [c for c in s["dp_clipped_fraction_per_round"] if c is not None]
            rows.append(
                (
                    z,
                    s["dp_epsilon"],
                    s["eval_accuracy"],
                    sum(clipped) / len(clipped) if clipped else None,
                )
            )
            eps = f"{s['dp_epsilon']:.3f}"
            print(
                f"z = {z:g}: epsilon {eps} at delta {s['dp_delta']:g}, "
                f"accuracy {s['eval_accuracy']:.4f}"
            )
    finally:
        stop_ray(started)
    _write(rows, curves, args.out)
    return 0


def _write(rows, curves, out: Path) -> None:
    with (out / "results.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["noise_multiplier", "epsilon", "final_eval_accuracy", "mean_clipped_fraction"])
        w.writerows(rows)
    lines = [
        "| noise multiplier z | epsilon (delta 1e-5) | test accuracy | clipped updates |",
        "|---:|---:|---:|---:|",
    ]
    for z, eps, acc, clip in rows:
        e = "inf (no noise)" if eps is None or math.isinf(eps) else f"{eps:.2f}"
        c = "" if clip is None else f"{clip:.0%}"
        lines.append(f"| {z:g} | {e} | {acc:.3f} | {c} |")
    (out / "results.md").write_text("\n".join(lines) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    for z, recs in curves.items():
        xs = [r["round"] for r in recs]
        a1.plot(xs, [r["eval_accuracy"] for r in recs], label=f"z = {z:g}")
        eps = [(r["round"], r["dp_epsilon"]) for r in recs if r.get("dp_epsilon") is not None]
        if eps:
            a2.plot(*zip(*eps, strict=True), label=f"z = {z:g}")
    a1.set_xlabel("round")
    a1.set_ylabel("test accuracy")
    a1.grid(alpha=0.3)
    a1.legend()
    a2.set_xlabel("round")
    a2.set_ylabel("epsilon at delta 1e-5")
    a2.set_yscale("log")
    a2.grid(alpha=0.3)
    a2.legend()
    fig.tight_layout()
    fig.savefig(out / "results.png", dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
