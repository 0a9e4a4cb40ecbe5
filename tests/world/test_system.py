"""Device timing, device-profile files, dropouts and the time-to-target summary."""

from __future__ import annotations

import numpy as np
import pytest

from fedsim.errors import ScenarioError
from fedsim.runner import _target
from fedsim.world.config import DropoutSection, SystemSection
from fedsim.world.system import DropoutModel, SystemModel


def test_round_time_is_download_plus_compute_plus_upload():
    spec = SystemSection.model_validate(
        {
            "speed": {"kind": "fixed", "value": 100.0},
            "download": {"kind": "fixed", "value": 1000.0},
            "upload": {"kind": "fixed", "value": 500.0},
        }
    )
    m = SystemModel(spec, num_clients=4, seed=0)
    t = m.timing(
        np.array([0, 3]),
        work=np.array([200.0, 50.0]),
        model_bytes=1000,
        update_bytes=1000,
        server_round=1,
    )
    assert t.total.tolist() == [1.0 + 2.0 + 2.0, 1.0 + 0.5 + 2.0]


def test_lognormal_speeds_are_per_client_and_seeded():
    spec = SystemSection.model_validate(
        {"speed": {"kind": "lognormal", "median": 50.0, "sigma": 1.0}}
    )
    a = SystemModel(spec, num_clients=10_000, seed=3).speed
    b = SystemModel(spec, num_clients=10_000, seed=3).speed
    assert np.array_equal(a, b) and abs(np.median(a) / 50.0 - 1) < 0.05
    assert not np.array_equal(a, SystemModel(spec, num_clients=10_000, seed=4).speed)


def test_stragglers_slow_exactly_the_configured_fraction_of_each_cohort():
    spec = SystemSection.model_validate(
        {"stragglers": {"fraction": 0.9, "slowdown_min": 2.0, "slowdown_max": 20.0}}
    )
    m = SystemModel(spec, num_clients=30, seed=0)
    cids = np.arange(10)
    t = m.timing(cids, work=np.full(10, 1000.0), model_bytes=0, update_bytes=0, server_round=5)
    assert (t.compute > 1.0 + 1e-9).sum() == 9 and (t.compute <= 20.0).all()


def test_device_profiles_by_client_id_and_drawn_from_a_pool(tmp_path):
    f = tmp_path / "devices.csv"
    f.write_text("client_id,samples_per_s,download_Bps,upload_Bps\n1,10,100,50\n0,20,200,25\n")
    spec = SystemSection(profiles=str(f))
    m = SystemModel(spec, num_clients=2, seed=0)
    assert m.speed.tolist() == [20.0, 10.0] and m.up.tolist() == [25.0, 50.0]
    pool = tmp_path / "pool.csv"
    pool.write_text("samples_per_s,download_Bps,upload_Bps\n10,100,50\n20,200,25\n")
    m = SystemModel(SystemSection(profiles=str(pool)), num_clients=1000, seed=0)
    assert set(m.speed.tolist()) == {10.0, 20.0}


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("samples_per_s,download_Bps\n1,2\n", "missing column"),
        ("samples_per_s,download_Bps,upload_Bps\n1,x,2\n", "line 2: not a number"),
        ("samples_per_s,download_Bps,upload_Bps\n1,0,2\n", "line 2: values must be > 0"),
        ("client_id,samples_per_s,download_Bps,upload_Bps\n7,1,1,1\n", "client_id 7"),
        ("client_id,samples_per_s,download_Bps,upload_Bps\n0,1,1,1\n", "one row per client"),
    ],
)
def test_bad_profile_files_name_the_key_and_line(tmp_path, text, match):
    f = tmp_path / "devices.csv"
    f.write_text(text)
    with pytest.raises(ScenarioError, match=match) as err:
        SystemModel(SystemSection(profiles=str(f)), num_clients=2, seed=0)
    assert err.value.problems[0][0] == "system.profiles"


def test_dropout_rate_and_agreement_between_single_and_batch_draws():
    m = DropoutModel(DropoutSection(p=0.2), num_clients=500, seed=1)
    cids = np.arange(500)
    many = m.dropped_many(cids, 3)
    assert abs(many.mean() - 0.2) < 0.05
    assert [m.dropped(int(c), 3) for c in cids[:50]] == many[:50].tolist()
    assert not DropoutModel(DropoutSection(), num_clients=5, seed=0).active


def test_time_to_target_accuracy():
    recs = [
        {"round": 1, "eval_accuracy": 0.5, "virtual_time_s": 10.0},
        {"round": 2, "eval_accuracy": 0.8, "virtual_time_s": 25.0},
        {"round": 3, "eval_accuracy": 0.7, "virtual_time_s": 40.0},
    ]
    assert _target(recs, 0.75)["virtual_time_to_target_s"] == 25.0
    assert _target(recs, 0.75)["target_round"] == 2
    assert _target(recs, 0.9)["virtual_time_to_target_s"] is None
    assert _target(recs, None) == {}
    client_only = [
        {"round": 1, "eval_accuracy": None, "client_eval_accuracy": 0.9, "virtual_time_s": 5.0}
    ]
    assert _target(client_only, 0.8)["target_metric"] == "client_eval_accuracy"
