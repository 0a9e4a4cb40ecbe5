"""Generated per-client data: deterministic, lazy, and the Federation interface."""

import numpy as np
import pytest

from fedsim.data import GeneratedData, load_federation, partition_summary


def test_client_data_is_a_function_of_seed_and_client():
    spec = GeneratedData(num_clients=1_000_000, samples_per_client=5, test_samples_per_client=2)
    a, b = spec.load(seed=3), spec.load(seed=3)
    xa, ya = a.train_data(999_999)
    xb, yb = b.train_data(999_999)
    assert np.array_equal(xa, xb) and np.array_equal(ya, yb)
    assert xa.shape == (5, 784) and ya.dtype == np.int64 and a.test_data(7)[0].shape == (2, 784)
    assert not np.array_equal(a.train_data(1)[0], a.train_data(2)[0])
    assert not np.array_equal(xa, spec.load(seed=4).train_data(999_999)[0])
    assert a.train_sizes().shape == (1_000_000,) and int(a.train_sizes()[0]) == 5


def test_train_labels_are_the_train_datas_labels_drawn_alone():
    # (partition_summary reads labels only: drawing every example cost it ~0.4 ms a client)
    for spec in (GeneratedData(num_clients=5), GeneratedData(num_clients=5, num_classes=3)):
        fed = spec.load(seed=11)
        for cid in range(5):
            assert np.array_equal(fed.train_labels(cid), fed.train_data(cid)[1])
        with pytest.raises(IndexError):
            fed.train_labels(5)


def test_shapes_classes_and_out_of_range():
    spec = GeneratedData(
        num_clients=3, input_shape=[1, 28, 28], num_classes=4, server_test_samples=20
    )
    fed = spec.load(seed=0)
    x, y = fed.train_data(2)
    assert x.shape == (50, 1, 28, 28) and set(np.unique(y)) <= set(range(4))
    assert fed.x_test.shape == (20, 1, 28, 28) and not fed.x_test.flags.writeable
    with pytest.raises(IndexError):
        fed.train_data(3)


def test_classes_are_separable_by_their_centres():
    fed = GeneratedData(num_clients=2, noise=0.5).load(seed=0)
    x, y = fed.train_data(0)
    # nearest centre recovers the label for well-separated clusters
    d = ((x[:, None, :] - fed._centres[None]) ** 2).sum(-1)
    assert (d.argmin(1) == y).mean() > 0.95


def test_summary_of_a_huge_population_is_a_sample():
    fed = load_federation(GeneratedData(num_clients=50_000, samples_per_client=2), seed=0)
    summary = partition_summary(fed)
    assert summary["sampled"] is True and summary["num_clients"] == 50_000
    assert 9_000 < len(summary["clients"]) <= 10_000
    assert summary["clients"][-1]["client_id"] == 49_999
