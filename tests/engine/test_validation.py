"""Reply validation: a broken or hostile reply is rejected with its reason, only its own
client is left out, and the model is the one aggregated without that client, on every
engine (fedsim's workers fold; Flower's runtime screens at the coordinator)."""

from __future__ import annotations

import csv
import hashlib
import math
import re
from pathlib import Path

import numpy as np
import pytest
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)

from fedsim.engine.screening import REJECTED, checked, rejection, screen
from fedsim.engine.validation import Invalid, ReplyLimits, check_metrics, check_update
from fedsim.results import read_metrics, without_timing
from fedsim.runner import execute
from fedsim.scenario import load_scenario
from fedsim.transforms import Chains

pytestmark = pytest.mark.usefixtures("task_identity")

W = np.arange(6, dtype=np.float32).reshape(2, 3)
B = np.zeros(3, np.float32)


def _base():
    return ArrayRecord({"w": Array(W), "b": Array(B)})


def _arrays(**over):
    arrays = {"w": W + 1, "b": B + 1, **over}
    return ArrayRecord({k: Array(np.asarray(v)) for k, v in arrays.items() if v is not None})


huge = np.full((2, 3), np.finfo(np.float32).max / 2, np.float32)

ARRAY_FAULTS = {
    "nan": (_arrays(w=np.where(W > 2, np.nan, W).astype(np.float32)), "'w' has non-finite"),
    "inf": (_arrays(b=np.array([0, np.inf, 0], np.float32)), "'b' has non-finite"),
    "-inf": (_arrays(b=np.array([0, -np.inf, 0], np.float32)), "'b' has non-finite"),
    "overflow": (_arrays(w=huge), "'w' has values too large"),
    "shape (1,)": (_arrays(b=np.ones(1, np.float32)), "'b' has shape (1,)"),
    "shape ()": (_arrays(b=np.float32(1)), "'b' has shape ()"),
    "transposed": (_arrays(w=(W + 1).T.copy()), "'w' has shape (3, 2)"),
    "float64": (_arrays(w=(W + 1).astype(np.float64)), "'w' has dtype float64"),
    "complex": (_arrays(w=(W + 1).astype(np.complex64)), "'w' has dtype complex64"),
    "missing": (_arrays(b=None), "missing ['b']"),
    "extra": (_arrays(bogus=np.ones(1, np.float32)), "extra ['bogus']"),
}


@pytest.mark.parametrize("fault", list(ARRAY_FAULTS))
def test_each_array_fault_is_refused_with_its_reason(fault):
    arrays, reason = ARRAY_FAULTS[fault]
    with pytest.raises(Invalid, match=re.escape(reason)):
        check_update(arrays, _base())


def test_a_valid_update_is_the_difference_to_the_model():
    update = check_update(_arrays(), _base())
    assert all(np.array_equal(d, np.ones_like(d)) for d in update.values())
    # Integer buffers (a BatchNorm count) are the model's too.
    steps = {"n": Array(np.array([3], np.int64))}
    base = ArrayRecord({"n": Array(np.array([1], np.int64))})
    assert check_update(ArrayRecord(steps), base)["n"].tolist() == [2.0]


WEIGHT_FAULTS = {
    "negative": (-299, True, "num-examples -299 is not positive"),
    "zero": (0, True, "num-examples 0 is not positive"),
    "above the shard": (51, True, "num-examples 51 exceeds the client's 50 examples"),
    "1e12": (1e12, True, "num-examples 1000000000000.0 exceeds"),
    "fraction": (2.5, True, "num-examples 2.5 is not an integer"),
    "nan": (math.nan, True, "metric 'num-examples' is not a finite number"),
    "negative in evaluation": (-1, False, "num-examples -1 is not >= 0"),
    "above the held-out split": (11, False, "exceeds the client's 10 examples"),
}


@pytest.mark.parametrize("fault", list(WEIGHT_FAULTS))
def test_each_num_examples_fault_is_refused_with_its_reason(fault):
    n, training, reason = WEIGHT_FAULTS[fault]
    limits = ReplyLimits(np.array([50]), np.array([10]))
    metrics = MetricRecord({"num-examples": n})
    with pytest.raises(Invalid, match=re.escape(reason)):
        check_metrics(metrics, limits.cap(0, training=training), training=training)


def test_metrics_must_be_finite_numbers_and_counts_within_the_limits():
    limits = ReplyLimits(np.array([50]), np.array([0]), max_examples=40)
    assert limits.cap(0, training=True) == 40 and limits.cap(0, training=False) == 0
    assert limits.cap(7, training=True) == 0  # a client the simulation does not know
    assert ReplyLimits().cap(3, training=True) is None
    ok = MetricRecord({"num-examples": 40, "loss": 0.5, "hist": [1.0, 2.0]})
    assert check_metrics(ok, 40, training=True) == 40.0
    assert check_metrics(MetricRecord({"num-examples": 0}), 0, training=False) == 0.0
    for bad in (math.nan, math.inf, [1.0, math.nan]):
        with pytest.raises(Invalid, match="metric 'loss' is not a finite number"):
            check_metrics(MetricRecord({"num-examples": 4, "loss": bad}), 40, training=True)
    capped = ReplyLimits(np.array([50]), None, 30)  # coordinator.max_examples
    assert capped.cap(0, training=True) == 30 and capped.cap(0, training=False) == 30
    with pytest.raises(Invalid, match="no 'num-examples'"):
        check_metrics(MetricRecord({"loss": 1.0}), 40, training=True)


def _instruction(kind=MessageType.TRAIN):
    content = RecordDict({"arrays": _base(), "config": ConfigRecord({"server-round": 1})})
    msg = Message(content, dst_node_id=7, message_type=kind)
    msg.metadata.__dict__["_message_id"] = "m"
    return msg


def _reply(msg, arrays, metrics):
    records = {"metrics": MetricRecord(metrics)}
    if arrays is not None:
        records["arrays"] = arrays
    return Message(RecordDict(records), reply_to=msg)


def test_screen_turns_an_invalid_reply_into_a_rejection_that_names_the_reason():
    msg = _instruction()
    limits = ReplyLimits(np.array([50]))
    for arrays, reason in ARRAY_FAULTS.values():
        reply, update = screen(_reply(msg, arrays, {"num-examples": 5}), msg, Chains(), 0, limits)
        assert update is None and reply.error.code == REJECTED
        assert reason in rejection(reply)
    reply, update = screen(_reply(msg, _arrays(), {"num-examples": 99}), msg, Chains(), 0, limits)
    assert update is None and "exceeds the client's 50 examples" in rejection(reply)
    reply, update = screen(_reply(msg, None, {"num-examples": 5}), msg, Chains(), 0, limits)
    assert rejection(reply) == "no model arrays"
    reply, update = screen(_reply(msg, _arrays(), {"num-examples": 5}), msg, Chains(), 0, limits)
    assert not reply.has_error() and update is not None
    evaluation = _instruction(MessageType.EVALUATE)
    bad = _reply(evaluation, None, {"num-examples": 3, "eval_loss": math.nan})
    assert "'eval_loss'" in rejection(checked(bad, evaluation, 0, ReplyLimits()))


# --- end to end: one client per fault, on both engines --------------------------------


FAULTY_PLUGIN = Path(__file__).resolve().parents[1] / "plugins" / "faulty.py"

# client id -> (fault, the reason participation.csv gives)
E2E_FAULTS = {
    0: ("shape (1,)", "has shape (1,)"),
    1: ("nan", "has non-finite values"),
    3: ("inf", "has non-finite values"),
    4: ("shape ()", "has shape ()"),
    6: ("float64", "has dtype float64"),
    7: ("complex", "has dtype complex64"),
    9: ("missing", "arrays differ from the model's (missing"),
    10: ("extra", "extra ['bogus']"),
    12: ("negative", "num-examples -299 is not positive"),
    13: ("zero", "num-examples 0 is not positive"),
    15: ("1e12", "num-examples 1000000000000.0 exceeds the client's"),
    16: ("fraction", "num-examples 2.5 is not an integer"),
    18: ("metric nan", "metric 'train_loss' is not a finite number"),
}
EVAL_FAULTS = {2: "eval nan", 5: "eval huge"}


@pytest.fixture(scope="module")
def faulty_plugin():
    return FAULTY_PLUGIN


_RUNS: dict[tuple[str, str, bool], object] = {}


def _run(tmp_path, plugin, engine, strategy, *, fail_instead):
    """The run folder of one arm (each arm runs once per session)."""
    key = (engine, strategy, fail_instead)
    if key not in _RUNS:
        _RUNS[key] = _execute(tmp_path, plugin, engine, strategy, fail_instead=fail_instead)
    return _RUNS[key]


def _execute(tmp_path, plugin, engine, strategy, *, fail_instead):
    faults = {**{c: f for c, (f, _) in E2E_FAULTS.items()}, **EVAL_FAULTS}
    table = ", ".join(f'{c} = "{f}"' for c, f in faults.items())
    scn = load_scenario(
        None,
        [
            f"run.plugins=['{plugin}']",
            "run.rounds=2",
            "data.num_clients=20",
            "model.hidden=[8]",
            "client.behaviour=faulty",
            f"client.faults={{ {table} }}",
            f"client.fail_instead={'true' if fail_instead else 'false'}",
            f"strategy.name={strategy}",
            "strategy.clients_per_round=20",
            "strategy.evaluate_trained_clients=false",
            "strategy.evaluate_clients_per_round=20",
            f"simulation.engine={engine}",
        ],
    )
    out = tmp_path / f"{engine}-{strategy}-{fail_instead}"
    execute(scn, out=out)
    return out


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize(
    ("engine", "strategy"), [("fedsim", "fedavg"), ("flower", "fedavg"), ("fedsim", "fedmedian")]
)
def test_faulty_replies_are_rejected_and_the_model_is_aggregated_without_them(
    tmp_path, ray_cluster, faulty_plugin, engine, strategy
):
    bad = _run(tmp_path, faulty_plugin, engine, strategy, fail_instead=False)
    ref = _run(tmp_path, faulty_plugin, engine, strategy, fail_instead=True)
    # The model is exactly the one aggregated without the faulty clients.
    assert _sha(bad / "model.safetensors") == _sha(ref / "model.safetensors")
    rows = list(csv.DictReader((bad / "participation.csv").open()))
    for rnd in ("1", "2"):
        status = {int(r["client_id"]): r["status"] for r in rows if r["round"] == rnd}
        for cid, (_, reason) in E2E_FAULTS.items():
            assert status[cid].startswith("rejected:"), (cid, status[cid])
            assert reason.replace(",", ";") in status[cid], (cid, status[cid])
        honest = [c for c in range(20) if c not in E2E_FAULTS]
        assert all(status[c] == "aggregated" for c in honest), status
    records = read_metrics(bad)
    ref_records = read_metrics(ref)
    for rec, ref_rec in zip(records, ref_records, strict=True):
        assert rec["clients_rejected"] == len(E2E_FAULTS)
        assert rec["clients_aggregated"] == 20 - len(E2E_FAULTS)
        assert rec["eval_clients_rejected"] == len(EVAL_FAULTS)
        assert rec["eval_loss"] == ref_rec["eval_loss"] and math.isfinite(rec["eval_loss"])
        assert rec["client_eval_loss"] == ref_rec["client_eval_loss"]
        assert math.isfinite(rec["client_eval_loss"])


def test_both_engines_reject_the_same_replies_and_give_the_same_model(
    tmp_path, ray_cluster, faulty_plugin
):
    a = _run(tmp_path, faulty_plugin, "fedsim", "fedavg", fail_instead=False)
    b = _run(tmp_path, faulty_plugin, "flower", "fedavg", fail_instead=False)
    assert _sha(a / "model.safetensors") == _sha(b / "model.safetensors")
    assert (a / "participation.csv").read_text() == (b / "participation.csv").read_text()
    assert without_timing(read_metrics(a)) == without_timing(read_metrics(b))


@pytest.mark.parametrize("strategy", ["fedadam", "fedyogi", "fedadagrad"])
def test_a_strategy_stepping_in_float64_keeps_the_model_float32(tmp_path, ray_cluster, strategy):
    # Flower's adaptive strategies multiply float32 moments by a float64 step size: the
    # global model must keep its dtype, or every later reply would be rejected as
    # "dtype float32; the model's is float64" (it was, before this was fixed).
    from safetensors.numpy import load_file

    res = execute(
        load_scenario(
            None,
            [
                "run.rounds=3",
                "data.num_clients=4",
                "model.hidden=[8]",
                f"strategy.name={strategy}",
                "strategy.eta=0.01",
            ],
        ),
        out=tmp_path / "run",
    )
    records = read_metrics(res.out_dir)
    assert [r["clients_rejected"] for r in records] == [0, 0, 0]
    assert [r["clients_aggregated"] for r in records] == [4, 4, 4]
    weights = load_file(str(res.out_dir / "model.safetensors"))
    assert {str(w.dtype) for w in weights.values()} == {"float32"}
