"""Scenario schema: defaults, overrides, and one clear line per problem (exit 2)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from fedsim.cli import main
from fedsim.errors import ScenarioError
from fedsim.scenario import (
    Scenario,
    default_scenario_path,
    json_schema,
    load_scenario,
    parse_override,
    scenario_from_dict,
)

REPO = Path(__file__).resolve().parents[1]
SHARED_MNIST = REPO.parent / "shared" / "data" / "mnist"

SCENARIOS = sorted(Path(REPO, "scenarios").glob("*.toml"))


def _problems(raw: dict) -> list[str]:
    with pytest.raises(ScenarioError) as info:
        scenario_from_dict(raw)
    return info.value.lines()


def test_empty_scenario_gets_defaults():
    scn = scenario_from_dict({})
    assert scn.data.dataset == "digits" and scn.strategy.name == "fedavg"
    assert scn.model.name == "mlp" and scn.simulation.engine == "fedsim"
    assert scn.train_cohort == scn.num_clients


def test_embedded_default_is_the_quickstart_file():
    assert (
        default_scenario_path().read_text() == Path(REPO, "scenarios/quickstart.toml").read_text()
    )


def test_shipped_scenarios_exist():
    names = {p.name for p in SCENARIOS}
    assert {"quickstart.toml", "fedprox_synthetic.toml", "mnist_shards.toml"} <= names


@pytest.mark.skipif(not Path(SHARED_MNIST).is_dir(), reason="shared MNIST not present")
def test_cli_validate_passes_on_every_shipped_scenario(capsys, monkeypatch):
    monkeypatch.chdir(REPO)  # mnist_shards.toml names ../shared/data/mnist
    assert main(["validate", *map(str, SCENARIOS)]) == 0
    out = capsys.readouterr().out
    assert out.count(": ok") == len(SCENARIOS)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (
            {"data": {"partition": {"kind": "dirichlet", "alpha": 0}}},
            "data.partition.alpha: must be > 0",
        ),
        ({"run": {"rounds": "ten"}}, "run.rounds: must be an integer"),
        ({"run": {"roundz": 3}}, "run.roundz: unknown key"),
        ({"client": {"lr": -1}}, "client.lr: must be > 0"),
        ({"strategy": {"name": "fedfoo"}}, "strategy.name: unknown value 'fedfoo'"),
        ({"model": {"name": "mlp", "hidden": [0]}}, "model.hidden[0]: must be >= 1"),
        ({"strategy": {"name": "fedavg", "proximal_mu": 1}}, "strategy.proximal_mu: unknown key"),
        ({"simulation": {"engine": "spark"}}, "simulation.engine: must be one of"),
        ({"data": {"dataset": "mnist", "path": "/nonexistent/mnist"}}, "data.path:"),
        (
            {"strategy": {"clients_per_round": 50}},
            "strategy.clients_per_round: 50 > data.num_clients (20)",
        ),
        (
            {"strategy": {"name": "bulyan", "num_malicious_nodes": 2, "clients_per_round": 5}},
            "strategy.",
        ),
        ({"strategy": {"name": "fedprox", "proximal_mu": 1}, "client": {"mu": 1}}, "client.mu:"),
    ],
)
def test_each_problem_names_its_key_path(raw, expected):
    lines = _problems(raw)
    assert any(line.startswith(expected) for line in lines), lines


def test_several_problems_are_all_reported():
    lines = _problems({"run": {"rounds": 0, "seed": -1}, "client": {"epochs": 0}})
    assert sorted(line.split(":")[0] for line in lines) == [
        "client.epochs",
        "run.rounds",
        "run.seed",
    ]


def test_overrides_parse_toml_scalars_and_bare_strings():
    assert parse_override("run.rounds=3") == (["run", "rounds"], 3)
    assert parse_override("data.partition.alpha=0.1") == (["data", "partition", "alpha"], 0.1)
    assert parse_override("model.hidden=[64, 32]") == (["model", "hidden"], [64, 32])
    assert parse_override("data.path=../x/y") == (["data", "path"], "../x/y")
    assert parse_override('run.name="a b"') == (["run", "name"], "a b")
    with pytest.raises(ScenarioError, match="expected KEY=VALUE"):
        parse_override("run.rounds")


def test_set_overrides_a_file(tmp_path):
    f = tmp_path / "s.toml"
    f.write_text('[run]\nrounds = 5\n[data.partition]\nkind = "dirichlet"\n')
    scn = load_scenario(f, ["run.rounds=3", "data.partition.alpha=0.1", "strategy.name=fedprox"])
    assert scn.run.rounds == 3 and scn.data.partition.alpha == 0.1
    assert scn.strategy.name == "fedprox"
    with pytest.raises(ScenarioError, match=r"run\.rounds: is not a table"):
        load_scenario(f, ["run.rounds.x=1"])


def test_resolved_scenario_round_trips(tmp_path):
    scn = load_scenario(None, ["strategy.name=fedadam", "model.hidden=[32]"])
    f = tmp_path / "resolved.toml"
    f.write_text(scn.to_toml())
    assert load_scenario(f) == scn


def test_json_schema_describes_every_section():
    schema = json_schema()
    assert set(schema["properties"]) == {
        "run",
        "data",
        "model",
        "client",
        "strategy",
        "simulation",
        "churn",
        "system",
        "coordinator",
        "transforms",
        "attack",
        "privacy",
        "deployment",
    }
    text = json.dumps(schema)
    assert "proximal_mu" in text and "shards_per_client" in text
    assert "mean_on_s" in text and "straggler_policy" in text


def _write(tmp_path: Path, text: str) -> Path:
    f = tmp_path / "bad.toml"
    f.write_text(text)
    return f


def test_cli_syntax_error_exits_2_naming_the_file(tmp_path, capsys):
    f = _write(tmp_path, "[run\nrounds = 3\n")
    assert main(["validate", str(f)]) == 2
    err = capsys.readouterr().err
    assert str(f) in err and "TOML syntax error" in err


def test_cli_run_on_bad_scenario_exits_2_and_leaves_no_run_dir(tmp_path, capsys):
    f = _write(tmp_path, "[data.partition]\nkind = 'dirichlet'\nalpha = -1\n[run]\nbogus = 1\n")
    out = tmp_path / "out"
    assert main(["run", str(f), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert sorted(err) == [
        f"{f}: data.partition.alpha: must be > 0",
        f"{f}: run.bogus: unknown key",
    ]
    assert not out.exists() and list(tmp_path.iterdir()) == [f]


def test_cli_impossible_partition_is_a_scenario_error(tmp_path, capsys):
    f = _write(tmp_path, "[data]\nnum_clients = 1000\n[data.partition]\nkind = 'shards'\n")
    assert main(["validate", str(f)]) == 2
    assert "data." in capsys.readouterr().err


def test_cli_missing_file_exits_2(tmp_path, capsys):
    assert main(["validate", str(tmp_path / "nope.toml")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_scenario_is_immutable():
    scn = Scenario()
    with pytest.raises(ValidationError):
        scn.run.rounds = 3  # type: ignore[misc]
