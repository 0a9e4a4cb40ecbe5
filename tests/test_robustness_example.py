"""examples/robustness: every arm of the sweep is a valid scenario, and the table and
plot are written (the runs themselves are the documented command, not a CI test)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from fedsim.scenario import load_scenario

HERE = Path(__file__).resolve().parents[1] / "examples" / "robustness"


def _module():
    spec = importlib.util.spec_from_file_location("robustness_run", HERE / "run.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_every_arm_validates_with_20_percent_attackers():
    run = _module()
    assert set(run.STRATEGIES) == {
        "fedavg",
        "fedmedian",
        "fedtrimmedavg",
        "krum",
        "multikrum",
        "bulyan",
    }
    assert set(run.ATTACKS) == {"none", "sign_flip", "scale", "alie"}
    for s, s_sets in run.STRATEGIES.items():
        for a, a_sets in run.ATTACKS.items():
            scn = load_scenario(HERE / "scenario.toml", [f"strategy.name={s}", *s_sets, *a_sets])
            assert scn.strategy.name == s and scn.attack.kind == a
            n = scn.attack.num_attackers(scn.num_clients)
            assert n == (0 if a == "none" else 4)


def test_the_table_and_plot_are_written(tmp_path):
    run = _module()
    rows = [(s, a, 0.5) for s in run.STRATEGIES for a in run.ATTACKS]
    run._write(rows, tmp_path)
    table = (tmp_path / "results.md").read_text().splitlines()
    assert table[0] == "| strategy | none | sign_flip | scale | alie |"
    assert len(table) == 2 + len(run.STRATEGIES)
    assert (tmp_path / "results.png").stat().st_size > 1000
    assert len((tmp_path / "results.csv").read_text().splitlines()) == 1 + len(rows)
