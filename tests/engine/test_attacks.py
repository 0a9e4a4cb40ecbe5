"""Attacks end to end: the same model on both engines (local and omniscient attacks),
attackers counted per round, and a defence (norm_bound) sees what attackers send."""

from __future__ import annotations

import csv
import hashlib

import pytest

from fedsim.results import read_metrics, without_timing
from fedsim.runner import execute
from fedsim.scenario import load_scenario
from fedsim.world.participation import OUTCOMES

BASE = [
    "run.rounds=3",
    "data.num_clients=20",
    "model.hidden=[8]",
    "strategy.clients_per_round=10",
]


def _run(tmp_path, engine, *overrides):
    scn = load_scenario(None, [*BASE, f"simulation.engine={engine}", *overrides])
    out = tmp_path / f"{engine}-{abs(hash(overrides))}"
    execute(scn, out=out)
    return scn, out


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _statuses(out):
    rounds: dict[int, dict[int, str]] = {}
    for row in csv.DictReader((out / "participation.csv").open()):
        rounds.setdefault(int(row["round"]), {})[int(row["client_id"])] = row["status"]
    return rounds


@pytest.mark.parametrize("kind", ["sign_flip", "alie"])
def test_an_attack_gives_the_same_model_on_both_engines_and_counts_attackers(
    tmp_path, ray_cluster, kind
):
    attack = [f"attack.kind={kind}", "attack.fraction=0.25"]
    scn, a = _run(tmp_path, "fedsim", *attack)
    _, b = _run(tmp_path, "flower", *attack)
    _, clean = _run(tmp_path, "fedsim")
    assert _sha(a / "model.safetensors") == _sha(b / "model.safetensors")
    assert _sha(a / "model.safetensors") != _sha(clean / "model.safetensors")
    records = read_metrics(a)
    assert without_timing(records) == without_timing(read_metrics(b))
    attackers = set(scn.attack.attackers(20, scn.run.seed).tolist())
    assert len(attackers) == 5
    for rec, (rnd, status) in zip(records, sorted(_statuses(a).items()), strict=True):
        selected = {c for c, s in status.items() if s.split(":")[0] in OUTCOMES}
        assert rec["round"] == rnd
        assert rec["attackers_selected"] == len(selected & attackers)
        aggregated = {c for c, s in status.items() if s == "aggregated"}
        assert rec["attackers_aggregated"] == len(aggregated & attackers)
    assert sum(r["attackers_aggregated"] for r in records) > 0
    assert "attackers_selected" not in read_metrics(clean)[0]


def test_a_defence_sees_what_the_attackers_send(tmp_path, ray_cluster):
    # Boosted updates are rejected by a norm bound that honest updates pass.
    scn, out = _run(
        tmp_path,
        "fedsim",
        "attack.kind=scale",
        "attack.factor=1000",
        "attack.count=5",
        "transforms=[{ kind = 'norm_bound', max_norm = 50.0 }]",
    )
    attackers = set(scn.attack.attackers(20, scn.run.seed).tolist())
    seen = 0
    for status in _statuses(out).values():
        for c, s in status.items():
            if c in attackers and s.split(":")[0] in OUTCOMES:
                assert s.startswith("rejected:update norm"), (c, s)
                seen += 1
            elif s.split(":")[0] in OUTCOMES:
                assert s == "aggregated", (c, s)
    assert seen > 0
