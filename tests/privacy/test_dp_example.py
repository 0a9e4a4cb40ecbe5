"""examples/dp: every arm of the sweep is a valid central-DP scenario, the committed table
says what the README quotes, and the table and plot are written (the runs themselves
are the documented command, not a CI test)."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

from fedsim.scenario import load_scenario

ROOT = Path(__file__).resolve().parents[2]
HERE = ROOT / "examples" / "dp"


def _module():
    spec = importlib.util.spec_from_file_location("dp_run", HERE / "run.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_every_arm_is_central_dp_with_poisson_sampling_over_500_clients():
    run = _module()
    assert run.NOISE == (0.0, 0.5, 1.0, 2.0)
    for z in run.NOISE:
        scn = load_scenario(run.SCENARIO, [f"privacy.dp.noise_multiplier={z}"])
        assert scn.privacy.dp.mode == "central" and scn.privacy.dp.noise_multiplier == z
        assert scn.coordinator.sampling == "poisson" and scn.num_clients >= 500
        assert scn.privacy.delta == 1e-5


def test_the_committed_table_is_in_the_readme_and_believable():
    table = (HERE / "results.md").read_text().strip()
    assert table in (ROOT / "README.md").read_text()
    rows = [line.split("|")[1:-1] for line in table.splitlines()[2:]]
    acc = [float(r[2]) for r in rows]
    eps = [math.inf if "inf" in r[1] else float(r[1]) for r in rows]
    assert acc == sorted(acc, reverse=True) and eps == sorted(eps, reverse=True)


def test_the_table_and_plot_are_written(tmp_path):
    run = _module()
    recs = [{"round": r, "eval_accuracy": 0.1 * r, "dp_epsilon": 0.5 * r} for r in (1, 2)]
    rows = [(0.0, math.inf, 0.9, 0.2), (1.0, 3.0, 0.8, 0.3)]
    run._write(rows, {0.0: recs, 1.0: recs}, tmp_path)
    md = (tmp_path / "results.md").read_text()
    assert "| 0 | inf (no noise) | 0.900 | 20% |" in md and "| 1 | 3.00 | 0.800 | 30% |" in md
    assert (tmp_path / "results.png").stat().st_size > 0
    assert (tmp_path / "results.csv").read_text().startswith("noise_multiplier,")
