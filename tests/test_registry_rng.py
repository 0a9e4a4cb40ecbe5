import random

import numpy as np
import pytest
import torch

from fedsim.registry import Registry
from fedsim.rng import int_seed, np_rng, seed_sequence, torch_generator


def test_registry_refuses_duplicates_and_lists_known_names():
    reg: Registry[int] = Registry("widget")
    reg.register("b")(2)
    reg.add("a", 1)
    with pytest.raises(ValueError, match="widget 'a' is already registered"):
        reg.add("a", 3)
    with pytest.raises(ValueError, match=r"unknown widget 'c'; known: a, b"):
        reg.get("c")
    assert reg.names() == ["a", "b"] and reg.values() == [1, 2] and "a" in reg and len(reg) == 2


def test_same_purpose_and_keys_give_the_same_stream():
    a = np_rng(7, "sample", 3).random(5)
    b = np_rng(7, "sample", 3).random(5)
    assert np.array_equal(a, b)


@pytest.mark.parametrize(
    "other", [(8, "sample", 3), (7, "partition", 3), (7, "sample", 4), (7, "sample", 3, 0)]
)
def test_seed_purpose_and_keys_each_change_the_stream(other):
    assert not np.array_equal(np_rng(7, "sample", 3).random(5), np_rng(*other).random(5))


def test_torch_generator_and_int_seed_are_deterministic_and_leave_global_state():
    g_state = torch.random.get_rng_state()
    r_state = random.getstate()
    x = torch.rand(4, generator=torch_generator(1, "batch", 2, 5))
    y = torch.rand(4, generator=torch_generator(1, "batch", 2, 5))
    assert torch.equal(x, y)
    assert 0 <= int_seed(1, "x") < 2**63
    assert torch.equal(g_state, torch.random.get_rng_state()) and r_state == random.getstate()


def test_negative_seed_is_refused():
    with pytest.raises(ValueError, match="seed must be >= 0"):
        seed_sequence(-1, "x")
