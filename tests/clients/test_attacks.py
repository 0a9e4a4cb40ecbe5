"""Attack clients: who attacks, and what each kind of attacker sends."""

from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np
import pytest

from clients.attacks import Alie, Gaussian, Ipm, LabelFlip, Scale, SignFlip, alie_z
from fedsim.errors import ScenarioError
from fedsim.scenario import load_scenario


def test_attackers_are_a_fixed_seeded_set_of_the_population():
    a = SignFlip(fraction=0.2)
    ids = a.attackers(1000, seed=3)
    assert len(ids) == 200 == len(set(ids.tolist())) and ids.tolist() == sorted(ids.tolist())
    assert np.array_equal(ids, a.attackers(1000, seed=3))
    assert not np.array_equal(ids, a.attackers(1000, seed=4))
    assert SignFlip(count=7).attackers(1000, seed=3).size == 7
    assert SignFlip().attackers(1000, seed=3).size == 0
    # a million clients: drawn without a permutation of the population
    assert SignFlip(count=5).attackers(1_000_000, seed=0).max() < 1_000_000


def _update():
    return {"w": np.array([1.0, -2.0, 0.5], np.float32), "b": np.array([3.0], np.float32)}


def test_local_attacks_turn_the_honest_update_into_theirs():
    rng = np.random.default_rng(0)
    flipped = SignFlip().craft(_update(), rng)
    assert flipped["w"].tolist() == [-1.0, 2.0, -0.5] and flipped["b"].tolist() == [-3.0]
    scaled = Scale(factor=10).craft(_update(), rng)
    assert scaled["w"].tolist() == [10.0, -20.0, 5.0] and scaled["w"].dtype == np.float32
    noise = Gaussian(std=2.0).craft({"w": np.zeros(100_000, np.float32)}, rng)["w"]
    assert noise.dtype == np.float32 and abs(noise.std() - 2.0) < 0.02 and abs(noise.mean()) < 0.02
    x, y = np.zeros((4, 2)), np.array([0, 1, 2, 9])
    assert LabelFlip().poison(x, y, 10)[1].tolist() == [9, 8, 7, 0]


def test_alie_shifts_the_honest_mean_by_z_standard_deviations():
    # Baruch et al.: s = floor(n/2 + 1) - m, z = Phi^-1((n - s) / n)
    assert alie_z(20, 4) == pytest.approx(NormalDist().inv_cdf(13 / 20))
    assert alie_z(50, 12) == pytest.approx(NormalDist().inv_cdf(36 / 50))
    honest = [{"w": np.array([1.0, 4.0], np.float32)}, {"w": np.array([3.0, 0.0], np.float32)}]
    out = Alie(z=1.5).craft_round(honest, 1, 3, np.random.default_rng(0))["w"]
    assert out.tolist() == pytest.approx([2.0 - 1.5 * 1.0, 2.0 - 1.5 * 2.0])
    default = Alie().craft_round(honest, 1, 3, np.random.default_rng(0))["w"]
    z = alie_z(3, 1)
    assert default.tolist() == pytest.approx([2.0 - z, 2.0 - 2 * z])
    assert Alie().craft_round([], 2, 2, np.random.default_rng(0)) is None


def test_ipm_sends_the_negated_scaled_honest_mean():
    honest = [{"w": np.array([1.0, 4.0], np.float32)}, {"w": np.array([3.0, 0.0], np.float32)}]
    out = Ipm(epsilon=0.5).craft_round(honest, 1, 3, np.random.default_rng(0))["w"]
    assert out.tolist() == [-1.0, -1.0] and out.dtype == np.float32


@pytest.mark.parametrize(
    ("overrides", "where"),
    [
        (["attack.fraction=0.2"], "attack.kind"),
        (["attack.kind=scale", "attack.count=3", "attack.fraction=0.1"], "attack.count"),
        (["attack.kind=scale", "attack.count=99"], "attack.count"),
        (["attack.kind=scale", "attack.factor=inf"], "attack.factor"),
        (["attack.kind=nope"], "attack.kind"),
    ],
)
def test_bad_attack_tables_are_one_error_naming_the_key(overrides, where):
    with pytest.raises(ScenarioError) as err:
        load_scenario(None, ["data.num_clients=20", *overrides])
    assert where in str(err.value)


def test_an_attack_table_validates():
    scn = load_scenario(None, ["attack.kind=alie", "attack.fraction=0.2"])
    assert scn.attack.kind == "alie" and type(scn.attack).omniscient
    assert math.isclose(scn.attack.fraction, 0.2)
    assert load_scenario(None, []).attack.kind == "none"
