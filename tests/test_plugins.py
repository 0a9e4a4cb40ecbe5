"""User plug-ins (``run.plugins``): registrations in a user's file work like built-ins,
in validation, the schema, and runs on both engines (Ray workers import them too)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from fedsim.errors import ScenarioError
from fedsim.results import read_metrics, without_timing
from fedsim.runner import execute
from fedsim.scenario import load_scenario

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "examples" / "plugins" / "scenario.toml"
SHORT = ["run.rounds=2", "data.num_clients=4"]


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _write(tmp_path: Path, name: str, code: str) -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(code))
    return path


@pytest.fixture
def in_repo(monkeypatch):
    monkeypatch.chdir(REPO)  # the example names its plug-in relative to the repo root


def test_readme_example_runs_on_both_engines_with_the_same_model(in_repo, tmp_path, ray_cluster):
    scn = load_scenario(EXAMPLE, SHORT)
    assert (scn.strategy.name, scn.model.name, scn.data.dataset) == (
        "fedavg_slr",
        "norm_mlp",
        "breast_cancer",
    )
    fedsim_run = execute(scn, out=tmp_path / "fedsim")
    flower_run = execute(
        load_scenario(EXAMPLE, [*SHORT, "simulation.engine=flower"]), out=tmp_path / "flower"
    )
    a, b = fedsim_run.out_dir, flower_run.out_dir
    assert _sha(a / "model.safetensors") == _sha(b / "model.safetensors")
    assert without_timing(read_metrics(a)) == without_timing(read_metrics(b))
    # The plug-in's model really ran (its parameter count), and learned.
    summary = json.loads((a / "summary.json").read_text())
    assert summary["model_parameters"] == 30 * 16 + 16 + 2 * 16 + 16 * 2 + 2
    assert summary["eval_accuracy"] > 0.8
    # The resolved scenario names the plug-in by absolute path: it reruns from anywhere.
    resolved = load_scenario(a / "scenario.toml")
    assert Path(resolved.run.plugins[0]).is_absolute()


def test_server_lr_steps_from_the_fedavg_mean(in_repo, tmp_path, ray_cluster):
    # One round: FedAvg gives the mean m; eta_g = 1.5 gives w_0 + 1.5 (m - w_0).
    from safetensors.numpy import load_file

    from fedsim.data import load_federation
    from fedsim.engine.server import initial_arrays

    one_round = [*SHORT, "run.rounds=1"]
    scn = load_scenario(EXAMPLE, one_round)
    w0 = {k: v.numpy() for k, v in initial_arrays(scn, load_federation(scn.data, seed=0)).items()}
    mean = execute(
        load_scenario(EXAMPLE, [*one_round, "strategy.name=fedavg"]), out=tmp_path / "fedavg"
    )
    slr = execute(scn, out=tmp_path / "slr")
    m = load_file(mean.out_dir / "model.safetensors")
    w1 = load_file(slr.out_dir / "model.safetensors")
    assert scn.strategy.server_lr == 1.5
    for k, w in w0.items():
        np.testing.assert_allclose(w1[k], w + 1.5 * (m[k] - w), rtol=1e-5, atol=1e-6)
        assert not np.allclose(w1[k], m[k])


BEHAVIOUR_PLUGIN = """
    from typing import Literal

    import numpy as np
    from pydantic import Field

    from clients.behaviour import Behaviour, Outcome
    from fedsim.client_params import CLIENTS
    from fedsim.data import PARTITIONERS
    from fedsim.sections import Section


    @CLIENTS.register("lazy")
    class LazyClient(Behaviour):
        '''Trains nothing and reports a fixed loss.'''

        behaviour: Literal["lazy"] = "lazy"
        reported_loss: float = Field(7.0, gt=0)

        def train(self, task):
            return Outcome(len(task.y), {"train_loss": self.reported_loss})


    @PARTITIONERS.register("contiguous")
    class Contiguous(Section):
        '''Client i gets the i-th contiguous block of the pool.'''

        kind: Literal["contiguous"] = "contiguous"

        def split(self, labels, *, num_clients, rng):
            return [np.asarray(b, np.int64) for b in np.array_split(np.arange(len(labels)), num_clients)]
"""


@pytest.fixture(scope="module")
def behave_plugin(tmp_path_factory) -> Path:
    # One file per session: a second file registering the same names would be refused,
    # as it would be for a user.
    return _write(tmp_path_factory.mktemp("plugin"), "behave.py", BEHAVIOUR_PLUGIN)


def test_plugin_behaviour_and_partitioner_run_in_the_workers(tmp_path, ray_cluster, behave_plugin):
    plugin = behave_plugin
    scn = load_scenario(
        None,
        [
            *SHORT,
            f"run.plugins=['{plugin}']",
            "client.behaviour=lazy",
            "client.reported_loss=3.5",
            "data.partition.kind=contiguous",
            "model.hidden=[8]",
        ],
    )
    assert scn.client.behaviour == "lazy" and scn.data.partition.kind == "contiguous"
    res = execute(scn, out=tmp_path / "run")
    records = read_metrics(res.out_dir)
    # Every client's reply came from the plug-in's behaviour, run in a Ray worker.
    assert [r["train_loss"] for r in records] == pytest.approx([3.5, 3.5])
    # Lazy clients send w_t back unchanged: the global model never moves.
    assert records[0]["eval_accuracy"] == pytest.approx(records[1]["eval_accuracy"])
    parts = json.loads((res.out_dir / "partitions.json").read_text())["clients"]
    sizes = [c["train_size"] + c["test_size"] for c in parts]
    assert max(sizes) - min(sizes) <= 1  # contiguous blocks of near-equal size


def test_plugin_tables_are_validated_with_key_paths(tmp_path, behave_plugin):
    plugin = behave_plugin
    base = [f"run.plugins=['{plugin}']", "client.behaviour=lazy"]
    with pytest.raises(ScenarioError) as err:
        load_scenario(None, [*base, "client.reported_loss=-1"])
    assert err.value.lines() == ["client.reported_loss: must be > 0"]
    with pytest.raises(ScenarioError) as err:
        load_scenario(None, [*base, "client.nope=1"])
    assert err.value.lines() == ["client.nope: unknown key"]
    # Switching a file's plug-in variant to a built-in drops the keys it does not take.
    scenario = tmp_path / "s.toml"
    scenario.write_text(
        f'[run]\nplugins = ["{plugin}"]\n[client]\nbehaviour = "lazy"\nreported_loss = 2.0\n'
    )
    assert load_scenario(scenario).client.reported_loss == 2.0
    assert load_scenario(scenario, ["client.behaviour=sgd"]).client.behaviour == "sgd"


def test_unknown_behaviour_lists_the_known_ones():
    with pytest.raises(ScenarioError) as err:
        load_scenario(None, ["client.behaviour=nope"])
    (line,) = err.value.lines()
    assert line.startswith("client.behaviour: unknown value 'nope'") and "'sgd'" in line


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        (None, "FileNotFoundError: no such file"),
        ("raise RuntimeError('boom')\n", "RuntimeError: boom"),
        ("import no_such_module_xyz\n", "ModuleNotFoundError"),
        (
            "from fedsim.models import MODELS, MlpModel\nMODELS.add('mlp', MlpModel)\n",
            "model 'mlp' is already registered",
        ),
    ],
)
def test_a_broken_plugin_is_one_error_naming_the_entry(tmp_path, code, expected):
    path = tmp_path / "bad_plugin.py"
    if code is not None:
        path.write_text(code)
    with pytest.raises(ScenarioError) as err:
        load_scenario(None, [f"run.plugins=['ok_module_name_is_fine_but', '{path}']"])
    # The first entry is a module name that does not exist: it is reported first.
    (line,) = err.value.lines()
    assert line.startswith("run.plugins[0]: plug-in 'ok_module_name_is_fine_but'")
    with pytest.raises(ScenarioError) as err:
        load_scenario(None, [f"run.plugins=['{path}']"])
    (line,) = err.value.lines()
    assert line.startswith("run.plugins[0]: plug-in") and expected in line


def test_a_second_file_registering_a_taken_name_is_refused(tmp_path, behave_plugin):
    load_scenario(None, [f"run.plugins=['{behave_plugin}']"])
    load_scenario(None, [f"run.plugins=['{behave_plugin}']"])  # the same file: once
    copy = _write(tmp_path, "copy.py", BEHAVIOUR_PLUGIN)
    with pytest.raises(ScenarioError, match="client behaviour 'lazy' is already registered"):
        load_scenario(None, [f"run.plugins=['{copy}']"])


def test_cli_reports_a_broken_plugin_in_one_line_with_exit_2(tmp_path):
    bad = _write(tmp_path, "bad.py", "raise ValueError('not today')\n")
    scenario = tmp_path / "s.toml"
    scenario.write_text(f'[run]\nplugins = ["{bad}"]\n')
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0"}
    proc = subprocess.run(
        [sys.executable, "-m", "fedsim.cli", "validate", str(scenario)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"{scenario}: run.plugins[0]: plug-in '{bad}' failed to load: ValueError: not today"
    ]


def test_schema_lists_a_plugins_registrations(behave_plugin):
    plugin = behave_plugin
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0"}
    out = subprocess.run(
        [sys.executable, "-m", "fedsim.cli", "schema", "--plugin", str(plugin)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert '"lazy"' in text and '"contiguous"' in text and '"fedavg"' in text
    plain = subprocess.run(
        [sys.executable, "-m", "fedsim.cli", "schema"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert '"lazy"' not in plain.stdout and '"sgd"' in plain.stdout


def test_switching_a_table_under_a_plugin_variant_drops_its_keys(in_repo):
    # data.dataset comes from the plug-in; switching its partitioner drops alpha.
    scn = load_scenario(EXAMPLE, ["data.partition.kind=iid"])
    assert scn.data.dataset == "breast_cancer" and scn.data.partition.kind == "iid"


def test_plugin_strategies_overlap_evaluation_only_when_they_say_so():
    from fedsim.strategy_params import StrategyParams
    from strategies import FedAvgParams

    assert StrategyParams.overlaps_evaluation is False  # a plug-in that does not say
    assert FedAvgParams.overlaps_evaluation is True
