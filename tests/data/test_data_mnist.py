"""MNIST loader: both folder layouts (raw and gz), bad files, and the shared real data."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pydantic
import pytest

from fedsim.data import MnistData
from fedsim.data.mnist import IMAGES_MAGIC, LABELS_MAGIC, read_idx
from fedsim.errors import ScenarioError

SHARED_MNIST = Path(__file__).resolve().parents[3] / "shared" / "data" / "mnist"


def idx_bytes(array: np.ndarray, magic: int) -> bytes:
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def write(path: Path, data: bytes, *, gz: bool) -> None:
    if gz:
        with gzip.open(path.with_name(path.name + ".gz"), "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)


def make_images(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 10
    images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    images[:, 0, 0] = labels * 25  # lets tests tie an image back to its label
    return images, labels


def write_idx_pair(folder: Path, prefix: str, n: int, *, seed: int, gz: bool) -> np.ndarray:
    images, labels = make_images(n, seed)
    write(folder / f"{prefix}-images-idx3-ubyte", idx_bytes(images, IMAGES_MAGIC), gz=gz)
    write(folder / f"{prefix}-labels-idx1-ubyte", idx_bytes(labels, LABELS_MAGIC), gz=gz)
    return images


def write_csv(folder: Path, n: int, *, gz: bool) -> np.ndarray:
    images, labels = make_images(n, seed=9)
    table = np.column_stack([images.reshape(n, -1), labels])
    text = "\n".join(",".join(map(str, row)) for row in table) + "\n"
    write(folder / "mnist_5k.csv", text.encode(), gz=gz)
    return images


@pytest.mark.parametrize("gz", [False, True])
def test_standard_layout(tmp_path: Path, gz: bool) -> None:
    train = write_idx_pair(tmp_path, "train", 40, seed=1, gz=gz)
    test = write_idx_pair(tmp_path, "t10k", 20, seed=2, gz=not gz)  # mixed raw / gz
    fed = MnistData(path=str(tmp_path), num_clients=4).load(seed=0)
    assert fed.x.shape == (40, 1, 28, 28) and fed.x_test.shape == (20, 1, 28, 28)
    assert fed.x.dtype == np.float32 and fed.input_shape == (1, 28, 28)
    np.testing.assert_allclose(fed.x[:, 0], train / 255.0, rtol=1e-6)
    np.testing.assert_allclose(fed.x_test[:, 0], test / 255.0, rtol=1e-6)
    np.testing.assert_array_equal(fed.y, np.arange(40) % 10)
    assert fed.num_clients == 4
    everything = np.concatenate(fed.train_idx + fed.test_idx)
    np.testing.assert_array_equal(np.sort(everything), np.arange(40))


@pytest.mark.parametrize("gz", [False, True])
def test_shared_layout_pool_is_t10k_and_test_is_csv(tmp_path: Path, gz: bool) -> None:
    pool = write_idx_pair(tmp_path, "t10k", 30, seed=3, gz=gz)
    test = write_csv(tmp_path, 12, gz=gz)
    fed = MnistData(path=str(tmp_path), num_clients=3, client_test_fraction=0.0).load(seed=0)
    assert fed.x.shape == (30, 1, 28, 28) and fed.x_test.shape == (12, 1, 28, 28)
    np.testing.assert_allclose(fed.x[:, 0], pool / 255.0, rtol=1e-6)
    np.testing.assert_allclose(fed.x_test[:, 0], test / 255.0, rtol=1e-6)
    np.testing.assert_array_equal(fed.y_test, np.arange(12) % 10)
    assert all(te.size == 0 for te in fed.test_idx)


def test_relative_path_resolved_against_cwd(tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    folder = tmp_path / "mnist"
    folder.mkdir()
    write_idx_pair(folder, "t10k", 10, seed=0, gz=True)
    write_csv(folder, 5, gz=False)
    monkeypatch.chdir(tmp_path)
    spec = MnistData(path="mnist", num_clients=2)
    assert Path(spec.path) == folder.resolve()
    monkeypatch.chdir("/")
    assert spec.load(seed=0).x.shape[0] == 10


def test_bad_magic_names_the_file(tmp_path: Path) -> None:
    write_idx_pair(tmp_path, "t10k", 10, seed=0, gz=False)
    write_csv(tmp_path, 5, gz=False)
    bad = tmp_path / "t10k-labels-idx1-ubyte"
    images, _ = make_images(10, 0)
    bad.write_bytes(idx_bytes(images, IMAGES_MAGIC))  # an images file posing as labels
    with pytest.raises(ValueError, match=r"t10k-labels-idx1-ubyte: bad idx magic number"):
        read_idx(bad, magic=LABELS_MAGIC)
    with pytest.raises(ScenarioError) as info:
        MnistData(path=str(tmp_path), num_clients=2).load(seed=0)
    [(key, message)] = info.value.problems
    assert key == "data.path" and "t10k-labels-idx1-ubyte" in message and "0x00000801" in message


def test_truncated_idx_is_reported(tmp_path: Path) -> None:
    images, _ = make_images(4, 0)
    path = tmp_path / "x"
    path.write_bytes(idx_bytes(images, IMAGES_MAGIC)[:-10])
    with pytest.raises(ValueError, match="header promises 4x28x28"):
        read_idx(path, magic=IMAGES_MAGIC)


def test_missing_files_rejected_at_validation(tmp_path: Path) -> None:
    write_idx_pair(tmp_path, "t10k", 10, seed=0, gz=True)
    with pytest.raises(pydantic.ValidationError) as info:
        MnistData(path=str(tmp_path))
    [error] = info.value.errors()
    assert error["loc"] == ("path",)
    assert str(tmp_path) in error["msg"]
    assert "train-images-idx3-ubyte" in error["msg"] and "mnist_5k.csv" in error["msg"]


def test_not_a_directory_rejected(tmp_path: Path) -> None:
    with pytest.raises(pydantic.ValidationError, match="is not a directory"):
        MnistData(path=str(tmp_path / "nowhere"))
    with pytest.raises(pydantic.ValidationError, match="required"):
        MnistData()  # type: ignore[call-arg]


@pytest.mark.skipif(not SHARED_MNIST.is_dir(), reason="shared MNIST copy not present")
def test_real_shared_mnist() -> None:
    fed = MnistData(path=str(SHARED_MNIST), num_clients=10).load(seed=0)
    assert fed.x.shape == (10_000, 1, 28, 28) and fed.x_test.shape == (5_000, 1, 28, 28)
    readme_counts = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    assert np.bincount(fed.y, minlength=10).tolist() == readme_counts
    assert np.bincount(fed.y_test, minlength=10).tolist() == [500] * 10
    assert fed.x.min() >= 0.0 and fed.x.max() == 1.0
    assert sum(tr.size + te.size for tr, te in zip(fed.train_idx, fed.test_idx, strict=True)) == (
        10_000
    )
