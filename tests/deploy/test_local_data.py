"""A node's own data folder (`fedsim node --data`, `fedsim export`) and the settings that
go with it, without processes beyond the CLI: the deployment itself is in
test_deployment.py."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict

from clients.app import build_client_app
from fedsim.data import load_federation
from fedsim.data.local import LocalDataError, export_client, load_local_data
from fedsim.deploy.node import NodeOptions, node_argv
from fedsim.errors import ScenarioError
from fedsim.scenario import load_scenario

from .conftest import cli


def _folder(tmp_path, name="d", **arrays):
    root = tmp_path / name
    root.mkdir()
    train = arrays.pop("train", None)
    if train is not None:
        np.savez(root / "train.npz", **train)
    test = arrays.pop("test", None)
    if test is not None:
        np.savez(root / "test.npz", **test)
    return root


def _xy(n=5, d=4, classes=3):
    rng = np.random.default_rng(0)
    return {"x": rng.standard_normal((n, d)), "y": rng.integers(0, classes, n)}


def test_a_folder_is_read_as_float32_and_int64_read_only(tmp_path):
    root = _folder(tmp_path, train=_xy(6), test=_xy(2))
    data = load_local_data(root)
    assert data.x.dtype == np.float32 and data.y.dtype == np.int64
    assert data.x.shape == (6, 4) and data.x_test.shape == (2, 4)
    assert not data.x.flags.writeable and not data.y.flags.writeable
    data.check((4,), 3)
    with pytest.raises(LocalDataError, match=r"shape \[4\]; the scenario's model takes \[8\]"):
        data.check((8,), 3)
    with pytest.raises(LocalDataError, match="label 2 is not a class"):
        data.check((4,), 2)
    # no test.npz: an empty held-out split (the client evaluates on nothing)
    alone = load_local_data(_folder(tmp_path, "e", train=_xy(3)))
    assert alone.x_test.shape == (0, 4) and alone.y_test.shape == (0,)


BAD = [
    ({}, "train.npz: missing"),
    ({"train": {"x": np.zeros((2, 3))}}, "expected exactly 'x' and 'y'"),
    ({"train": {**_xy(), "z": np.zeros(1)}}, "expected exactly 'x' and 'y'"),
    ({"train": {"x": np.zeros((3, 2)), "y": np.zeros(2, np.int64)}}, "3 examples and y 2"),
    ({"train": {"x": np.full((2, 2), np.nan), "y": np.zeros(2, np.int64)}}, "non-finite"),
    ({"train": {"x": np.zeros((2, 2)), "y": np.array([0, -1])}}, "negative label"),
    ({"train": {"x": np.zeros((2, 2)), "y": np.zeros(2)}}, "integer class labels"),
    ({"train": {"x": np.zeros(2), "y": np.zeros(2, np.int64)}}, "shape (n, *input_shape)"),
    ({"train": {"x": np.zeros((0, 2)), "y": np.zeros(0, np.int64)}}, "has no examples"),
    ({"train": _xy(d=4), "test": _xy(d=5)}, "train.npz's are [4]"),
    # arrays of Python objects would need unpickling: refused, never loaded
    (
        {"train": {"x": np.array([{"a": 1}, None], dtype=object), "y": np.zeros(2, np.int64)}},
        "without unpickling",
    ),
]


@pytest.mark.parametrize(("arrays", "words"), BAD)
def test_a_bad_folder_is_named_with_its_file_and_problem(arrays, words, tmp_path):
    root = _folder(tmp_path, **arrays)
    with pytest.raises(LocalDataError) as e:
        load_local_data(root)
    assert words in str(e.value) and str(root) in str(e.value)


def test_a_damaged_file_is_refused(tmp_path):
    root = tmp_path / "d"
    root.mkdir()
    (root / "train.npz").write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(LocalDataError, match="not a readable .npz"):
        load_local_data(root)
    with pytest.raises(LocalDataError, match="not a folder"):
        load_local_data(tmp_path / "nowhere")


def test_export_writes_whole_folders_and_never_overwrites(tmp_path):
    train, test = (
        (np.zeros((2, 3)), np.zeros(2, np.int64)),
        (np.zeros((1, 3)), np.zeros(1, np.int64)),
    )
    export_client(train, test, tmp_path / "c")
    assert load_local_data(tmp_path / "c").x.shape == (2, 3)
    with pytest.raises(LocalDataError, match="exists already"):
        export_client(train, test, tmp_path / "c")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]


def test_the_export_command_writes_a_scenarios_partitions(tmp_path):
    sets = ["--set", "data.num_clients=4"]
    r = cli("export", "scenarios/quickstart.toml", str(tmp_path / "x"), *sets,
             "--partition-id", "1", "--partition-id", "3", cwd=_repo())  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in (tmp_path / "x").iterdir()) == ["client-1", "client-3"]
    scn = load_scenario(_repo() / "scenarios/quickstart.toml", ["data.num_clients=4"])
    fed = load_federation(scn.data, seed=scn.run.seed)
    got = load_local_data(tmp_path / "x" / "client-3")
    np.testing.assert_array_equal(got.x, fed.train_data(3)[0])
    np.testing.assert_array_equal(got.y_test, fed.test_data(3)[1])
    # never over an existing folder; a client the scenario does not have
    r = cli("export", "scenarios/quickstart.toml", str(tmp_path / "x"), cwd=_repo())
    assert r.returncode == 2 and r.stderr.strip().endswith("exists already (nothing was written)")
    r = cli("export", "scenarios/quickstart.toml", str(tmp_path / "y"), *sets,
             "--partition-id", "4", cwd=_repo())  # fmt: skip
    assert r.returncode == 2 and "clients 0..3" in r.stderr and not (tmp_path / "y").exists()


def _repo():
    from pathlib import Path

    return Path(__file__).resolve().parents[2]


def test_a_node_with_a_bad_data_folder_exits_2_with_one_line(tmp_path):
    _folder(tmp_path, "bad", train={"x": np.zeros((2, 2)), "y": np.zeros(2)})
    r = cli("node", "--superlink", "127.0.0.1:9092", "--partition-id", "0", "--insecure",
             "--data", "bad", cwd=tmp_path)  # fmt: skip
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fedsim node: --data: ")
    assert "integer class labels" in lines[0]


def test_the_node_hands_its_folder_to_the_client_app(tmp_path):
    from flwr.common.config import parse_config_args

    for folder in (tmp_path / "a folder", tmp_path / "the client's data"):
        argv = node_argv(NodeOptions(superlink="10.0.0.1:9092", partition_id=2, insecure=True,
                                     port=9100, data_dir=folder))  # fmt: skip
        conf = parse_config_args([argv[argv.index("--node-config") + 1]])
        assert conf == {"partition-id": 2, "data-dir": str(folder)}


@pytest.fixture
def task_identity():
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1
    yield
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved


def test_the_client_app_trains_on_the_nodes_folder(tmp_path, task_identity):
    """The same ClientApp, given ``data-dir``, trains on that folder: on an exported
    partition it replies exactly as on the partition itself."""
    scn = load_scenario(None, ["data.num_clients=4", "run.rounds=1"])
    fed = load_federation(scn.data, seed=scn.run.seed)
    export_client(fed.train_data(2), fed.test_data(2), tmp_path / "c2")
    app = build_client_app(scn.model_dump_json())
    from fedsim.engine.server import initial_arrays

    arrays = initial_arrays(scn, fed)

    def ask(kind, node_config):
        msg = Message(
            RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": 1})}),
            dst_node_id=1,
            message_type=kind,
        )
        ctx = Context(
            run_id=1, node_id=1, node_config=node_config, state=RecordDict(), run_config={}
        )
        return app(msg, ctx)

    own = ask(MessageType.TRAIN, {"partition-id": 2, "data-dir": str(tmp_path / "c2")})
    part = ask(MessageType.TRAIN, {"partition-id": 2})
    assert not own.has_error(), own.error
    for k, a in part.content.array_records["arrays"].items():
        np.testing.assert_array_equal(own.content.array_records["arrays"][k].numpy(), a.numpy())
    info = ask(MessageType.QUERY, {"partition-id": 2, "data-dir": str(tmp_path / "c2")})
    assert info.content.metric_records["info"]["local-data"] == 1
    # a folder whose examples do not fit the model: that client's task fails, naming it
    (tmp_path / "w").mkdir()
    np.savez(tmp_path / "w" / "train.npz", x=np.zeros((3, 5)), y=np.zeros(3, np.int64))
    with pytest.raises(LocalDataError, match=r"w/train.npz: x has examples of shape \[5\]"):
        ask(MessageType.TRAIN, {"partition-id": 1, "data-dir": str(tmp_path / "w")})


BAD_SETTINGS = [
    (["deployment.client_data=local"], "coordinator.max_examples", "required"),
    (
        ["deployment.client_data=local", "coordinator.max_examples=100",
         "privacy.dp.mode=sample", "privacy.dp.clip_norm=1", "privacy.dp.noise_multiplier=1"],
        "privacy.dp.mode",
        "shard size",
    ),
]  # fmt: skip


@pytest.mark.parametrize(("sets", "key", "words"), BAD_SETTINGS)
def test_local_data_settings_name_their_key(sets, key, words):
    with pytest.raises(ScenarioError) as e:
        load_scenario(None, ["simulation.engine=deployment", "deployment.insecure=true", *sets])
    assert any(p == key and words in m for p, m in e.value.problems), e.value.problems


def test_a_deployed_scenario_file_simulates_unchanged(tmp_path):
    # The README's coordinator file ([deployment] table, engine deployment) simulated
    # with `--set simulation.engine=fedsim`: the table is ignored, not refused.
    creds = tmp_path / "lab"
    assert cli("credentials", str(creds), cwd=tmp_path).returncode == 0
    path = tmp_path / "scenario.toml"
    path.write_text(
        '[data]\nnum_clients = 3\n[simulation]\nengine = "deployment"\n'
        f'[deployment]\nfleet_address = "0.0.0.0:9092"\ncredentials = "{creds}"\n'
    )
    assert load_scenario(path).simulation.engine == "deployment"
    scn = load_scenario(path, ["simulation.engine=fedsim"])
    assert scn.simulation.engine == "fedsim" and scn.deployment.fleet_address == "0.0.0.0:9092"
