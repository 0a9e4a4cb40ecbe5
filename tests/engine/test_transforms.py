"""Update transforms: per-update (clip, reject) in the worker before folding, aggregate on
the mean at the coordinator; the same numbers on both engines."""

from __future__ import annotations

import csv
import hashlib
import math
import textwrap

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

from fedsim.engine.fold import leaf
from fedsim.engine.screening import REJECTED, rejection, screen, screened
from fedsim.engine.validation import ReplyLimits
from fedsim.results import read_metrics, without_timing
from fedsim.runner import execute
from fedsim.scenario import load_scenario
from fedsim.transforms import (
    Chains,
    ClipNorm,
    NormBound,
    Rejected,
    UpdateContext,
    UpdateTransform,
    l2_norm,
)

pytestmark = pytest.mark.usefixtures("task_identity")
NO_LIMITS = ReplyLimits()


def _ctx():
    return UpdateContext(seed=0, server_round=1, cid=3, weight=10.0)


def test_clip_norm_scales_a_large_update_to_the_bound_and_leaves_a_small_one():
    big = {"a": np.full(4, 3.0, np.float32), "b": np.full(1, 4.0, np.float32)}  # norm 7.2
    out = ClipNorm(max_norm=2.0).apply(big, _ctx())
    assert l2_norm(out) == pytest.approx(2.0, rel=1e-6)
    assert out["a"].dtype == np.float32
    small = {"a": np.array([0.3, 0.4], np.float32)}
    assert ClipNorm(max_norm=2.0).apply(small, _ctx())["a"].tolist() == pytest.approx([0.3, 0.4])


def test_norm_bound_rejects_large_and_non_finite_updates_with_a_reason():
    bound = NormBound(max_norm=1.0)
    assert bound.apply({"a": np.array([0.6, 0.8])}, _ctx())["a"].tolist() == [0.6, 0.8]
    with pytest.raises(Rejected, match=r"update norm 5 > 1"):
        bound.apply({"a": np.array([3.0, 4.0])}, _ctx())
    with pytest.raises(Rejected, match="nan"):
        bound.apply({"a": np.array([np.nan, 0.0])}, _ctx())


def _instruction(w):
    content = RecordDict(
        {"arrays": ArrayRecord({"w": Array(w)}), "config": ConfigRecord({"server-round": 2})}
    )
    msg = Message(content, dst_node_id=7, message_type=MessageType.TRAIN)
    msg.metadata.__dict__["_message_id"] = "m"
    return msg


def _reply(msg, w, n=5):
    content = RecordDict(
        {"arrays": ArrayRecord({"w": Array(w)}), "metrics": MetricRecord({"num-examples": n})}
    )
    return Message(content, reply_to=msg)


def test_screen_gives_the_transformed_update_or_an_error_saying_why():
    w_t = np.array([1.0, 1.0], np.float32)
    msg = _instruction(w_t)
    chains = Chains(update=(ClipNorm(max_norm=1.0), NormBound(max_norm=0.5)), seed=0)
    # clipped to norm 1, then rejected by the bound of 0.5
    reply, update = screen(_reply(msg, np.array([4.0, 1.0], np.float32)), msg, chains, 3, NO_LIMITS)
    assert update is None and reply.error.code == REJECTED
    assert rejection(reply) == "update norm 1 > 0.5"
    ok, update = screen(_reply(msg, np.array([1.3, 1.0], np.float32)), msg, chains, 3, NO_LIMITS)
    assert rejection(ok) is None and update["w"].tolist() == pytest.approx([0.3, 0.0], abs=1e-6)
    # a reply of the wrong shape is an error, not a crash and not a broadcast
    bad, update = screen(_reply(msg, np.zeros(1, np.float32)), msg, Chains(), 3, NO_LIMITS)
    assert update is None and "has shape (1,)" in rejection(bad)
    # handed to the strategy whole: it carries w_t + the clipped update
    whole = screened(
        _reply(msg, np.array([4.0, 1.0], np.float32)),
        msg,
        Chains(update=(ClipNorm(max_norm=1.0),)),
        3,
        NO_LIMITS,
    )
    assert whole.content["arrays"]["w"].numpy().tolist() == pytest.approx([2.0, 1.0])


def test_transforms_are_validated_with_their_key_paths():
    from fedsim.errors import ScenarioError

    with pytest.raises(ScenarioError) as err:
        load_scenario(None, ['transforms=[{kind="clip_norm"}]'])
    assert err.value.lines() == ["transforms[0].max_norm: is required"]


NOISE_PLUGIN = """
    from typing import Literal

    from fedsim.transforms import TRANSFORMS, AggregateTransform


    @TRANSFORMS.register("test_noise")
    class TestNoise(AggregateTransform):
        '''Gaussian noise on the mean update (a test: no privacy accounting).'''

        kind: Literal["test_noise"] = "test_noise"
        std: float = 0.01

        def apply(self, mean, ctx):
            for a in mean.values():
                a += ctx.rng.normal(0.0, self.std, a.shape).astype(a.dtype)
            return mean
"""


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_transforms_run_on_both_engines_with_the_same_model(tmp_path, ray_cluster):
    plugin = tmp_path / "noise.py"
    plugin.write_text(textwrap.dedent(NOISE_PLUGIN))
    base = [
        f"run.plugins=['{plugin}']",
        "run.rounds=2",
        "data.num_clients=6",
        "model.hidden=[8]",
        "client.lr=0.5",
        # reject updates of norm > 30 (some of these clients' updates are), clip the rest
        # to 20, then noise on the mean
        'transforms=[{kind="norm_bound", max_norm=30.0}, {kind="clip_norm", max_norm=20.0}, '
        '{kind="test_noise", std=0.001}]',
    ]
    runs = {
        engine: execute(
            load_scenario(None, [*base, f"simulation.engine={engine}"]), out=tmp_path / engine
        ).out_dir
        for engine in ("fedsim", "flower")
    }
    a, b = runs["fedsim"], runs["flower"]
    assert _sha(a / "model.safetensors") == _sha(b / "model.safetensors")
    assert without_timing(read_metrics(a)) == without_timing(read_metrics(b))
    rows = list(csv.DictReader((a / "participation.csv").open()))
    rejected = [r for r in rows if r["status"].startswith("rejected:")]
    records = read_metrics(a)
    # Some clients' updates exceed the bound: they are rejected, with the reason, and
    # counted; the others are aggregated.
    assert rejected and all("> 30" in r["status"] for r in rejected)
    assert sum(r["clients_rejected"] for r in records) == len(rejected)
    assert all(r["clients_aggregated"] + r["clients_rejected"] == 6 for r in records)
    assert all(r["clients_aggregated"] > 0 for r in records)
    assert (b / "participation.csv").read_text() == (a / "participation.csv").read_text()
    assert all(math.isfinite(r["eval_loss"]) for r in records)


class Broken(UpdateTransform):
    kind: str = "broken"

    def apply(self, update, ctx):
        raise KeyError("no such thing")


class Frozen(UpdateTransform):
    """Returns read-only arrays, the same object twice."""

    kind: str = "frozen"

    def apply(self, update, ctx):
        shared = np.zeros(2, np.float32)
        shared.flags.writeable = False
        return {k: shared for k in update}


def _two_array_instruction():
    content = RecordDict(
        {
            "arrays": ArrayRecord(
                {"w": Array(np.ones(2, np.float32)), "steps": Array(np.array([5], np.int64))}
            ),
            "config": ConfigRecord({"server-round": 1}),
        }
    )
    msg = Message(content, dst_node_id=7, message_type=MessageType.TRAIN)
    msg.metadata.__dict__["_message_id"] = "m"
    return msg


def _two_array_reply(msg, w, steps):
    content = RecordDict(
        {
            "arrays": ArrayRecord({"w": Array(w), "steps": Array(np.array([steps], np.int64))}),
            "metrics": MetricRecord({"num-examples": 2}),
        }
    )
    return Message(content, reply_to=msg)


def test_a_transform_that_raises_fails_its_client_not_the_run():
    msg = _two_array_instruction()
    reply, update = screen(
        _two_array_reply(msg, np.ones(2, np.float32), 5),
        msg,
        Chains(update=(Broken(),)),
        1,
        NO_LIMITS,
    )
    assert update is None and "update transform failed: KeyError" in reply.error.reason


def test_the_fold_never_writes_into_a_transforms_read_only_or_shared_arrays():
    msg = _two_array_instruction()
    reply, update = screen(
        _two_array_reply(msg, np.ones(2, np.float32), 5),
        msg,
        Chains(update=(Frozen(),)),
        1,
        NO_LIMITS,
    )
    assert all(a.flags.writeable for a in update.values())
    leaf(update, 3.0)  # in place: would raise on a read-only array


def test_transforms_see_only_floating_arrays():
    # A batch counter moving by 1000 is no part of the update's norm.
    msg = _two_array_instruction()
    reply, update = screen(
        _two_array_reply(msg, np.array([1.6, 1.8], np.float32), 1005),
        msg,
        Chains(update=(NormBound(max_norm=1.0),)),
        1,
        NO_LIMITS,
    )
    assert rejection(reply) is None and update["steps"].tolist() == [1000.0]
