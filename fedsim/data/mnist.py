"""MNIST from a local folder: the four standard idx files, or the shared offline subset.

LeCun, Bottou, Bengio, Haffner 1998, "Gradient-Based Learning Applied to Document
Recognition"; the idx format is described at yann.lecun.com/exdb/mnist. Two layouts:

- **standard**: ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
  ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte`` (each raw or ``.gz``): the
  60,000 training images are the client pool, the 10,000 t10k images the server test.
- **shared** (the offline copy in ``shared/data/mnist``): ``t10k-images-idx3-ubyte``,
  ``t10k-labels-idx1-ubyte`` (raw or ``.gz``) and ``mnist_5k.csv`` (or ``.csv.gz``; no
  header, 784 pixel columns then the label). The 10,000 t10k images become the client
  pool and the 5,000 CSV images the server test split (the two sets are disjoint).

If a folder holds both, the standard layout wins. Nothing is cached to disk.
"""

from __future__ import annotations

import gzip
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field, field_validator

from fedsim.data.federation import DATASETS, Federation, PartitionedData, build_federation
from fedsim.errors import ScenarioError

IMAGES_MAGIC = 0x00000803  # unsigned bytes, 3 dimensions
LABELS_MAGIC = 0x00000801  # unsigned bytes, 1 dimension
SIDE = 28
NUM_CLASSES = 10

STANDARD_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
SHARED_FILES = ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte", "mnist_5k.csv")


@dataclass(frozen=True)
class MnistFiles:
    """The files of one layout: ``pool_*`` feed the clients, ``test_*`` the server."""

    layout: Literal["standard", "shared"]
    pool_images: Path
    pool_labels: Path
    test_images: Path | None = None
    test_labels: Path | None = None
    test_csv: Path | None = None


def _expected() -> str:
    return (
        f"either the standard {', '.join(STANDARD_FILES)} or the shared "
        f"{', '.join(SHARED_FILES)} (each file raw or .gz)"
    )


def find_mnist_files(directory: str | Path) -> MnistFiles:
    """Locate the files of either layout in ``directory``; ``ValueError`` if neither."""
    folder = Path(directory)
    if not folder.is_dir():
        raise ValueError(
            f"MNIST path '{directory}' is not a directory; expected a folder with {_expected()}"
        )
    found: dict[str, Path] = {}
    for name in {*STANDARD_FILES, *SHARED_FILES}:
        for candidate in (folder / name, folder / f"{name}.gz"):
            if candidate.is_file():
                found[name] = candidate
                break
    if all(name in found for name in STANDARD_FILES):
        a, b, c, d = (found[n] for n in STANDARD_FILES)
        return MnistFiles("standard", a, b, test_images=c, test_labels=d)
    if all(name in found for name in SHARED_FILES):
        a, b, c = (found[n] for n in SHARED_FILES)
        return MnistFiles("shared", a, b, test_csv=c)
    missing_standard = [n for n in STANDARD_FILES if n not in found]
    missing_shared = [n for n in SHARED_FILES if n not in found]
    raise ValueError(
        f"MNIST path '{directory}' holds neither layout: the standard one lacks "
        f"{', '.join(missing_standard)}; the shared one lacks {', '.join(missing_shared)} "
        f"(expected {_expected()})"
    )


def _read_bytes(path: Path) -> bytes:
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (OSError, EOFError) as exc:
        raise ValueError(f"{path}: cannot read ({exc})") from exc


def read_idx(path: str | Path, *, magic: int) -> np.ndarray:
    """Parse one idx file of unsigned bytes (raw or ``.gz``) and check its magic number.

    The header is big-endian: the magic (``0x0000080N`` for N dimensions of ubyte), then
    N 32-bit sizes, then the data. Raises ``ValueError`` naming the file on any mismatch.
    """
    path = Path(path)
    raw = _read_bytes(path)
    if len(raw) < 4:
        raise ValueError(f"{path}: not an idx file ({len(raw)} bytes)")
    found = int.from_bytes(raw[:4], "big")
    if found != magic:
        raise ValueError(
            f"{path}: bad idx magic number 0x{found:08x}, expected 0x{magic:08x} "
            f"({'images' if magic == IMAGES_MAGIC else 'labels'})"
        )
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: idx header truncated")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    data = np.frombuffer(raw, dtype=np.uint8, offset=header)
    if data.size != int(np.prod(dims)):
        raise ValueError(
            f"{path}: header promises {'x'.join(map(str, dims))} = {int(np.prod(dims))} "
            f"bytes of data, file holds {data.size}"
        )
    return data.reshape(dims)


def read_mnist_csv(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Parse a header-less CSV of 784 pixel columns then the label (raw or ``.gz``)."""
    path = Path(path)
    try:
        table = np.loadtxt(path, delimiter=",", dtype=np.int64, ndmin=2)
    except (OSError, EOFError, ValueError) as exc:
        raise ValueError(f"{path}: cannot parse as MNIST CSV ({exc})") from exc
    if table.shape[1] != SIDE * SIDE + 1:
        raise ValueError(
            f"{path}: expected {SIDE * SIDE + 1} columns (784 pixels then the label), "
            f"found {table.shape[1]}"
        )
    pixels, labels = table[:, :-1], table[:, -1]
    if pixels.min(initial=0) < 0 or pixels.max(initial=0) > 255:
        raise ValueError(f"{path}: pixel values must lie in 0..255")
    _check_labels(path, labels)
    return pixels.astype(np.uint8).reshape(-1, SIDE, SIDE), labels


def _check_labels(path: Path, labels: np.ndarray) -> None:
    if labels.size and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
        raise ValueError(f"{path}: labels must lie in 0..{NUM_CLASSES - 1}")


def read_idx_pair(images: Path, labels: Path) -> tuple[np.ndarray, np.ndarray]:
    """Images ``(n, 28, 28)`` uint8 and labels ``(n,)`` int64 from two idx files."""
    x = read_idx(images, magic=IMAGES_MAGIC)
    if x.shape[1:] != (SIDE, SIDE):
        raise ValueError(f"{images}: images must be {SIDE}x{SIDE}, found {x.shape[1:]}")
    y = read_idx(labels, magic=LABELS_MAGIC).astype(np.int64)
    _check_labels(labels, y)
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"{images} holds {x.shape[0]} images but {labels} {y.shape[0]} labels")
    return x, y


def load_mnist_arrays(
    directory: str | Path,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(x_pool, y_pool, x_test, y_test)`` as uint8 images and int64 labels."""
    files = find_mnist_files(directory)
    x_pool, y_pool = read_idx_pair(files.pool_images, files.pool_labels)
    if files.layout == "standard":
        assert files.test_images is not None and files.test_labels is not None
        x_test, y_test = read_idx_pair(files.test_images, files.test_labels)
    else:
        assert files.test_csv is not None
        x_test, y_test = read_mnist_csv(files.test_csv)
    return x_pool, y_pool, x_test, y_test


def _scale(images: np.ndarray) -> np.ndarray:
    return (images.astype(np.float32) / 255.0)[:, None, :, :]


@DATASETS.register("mnist")
class MnistData(PartitionedData):
    """MNIST from a local folder (standard idx files, or the shared 10k + 5k subset)."""

    dataset: Literal["mnist"] = Field("mnist", description="Dataset name: MNIST from files.")
    path: str = Field(
        description="Folder with the MNIST files (relative to the working directory): the "
        "four standard idx files, or t10k-images/-labels idx plus mnist_5k.csv (each raw "
        "or .gz). In the second layout the 10,000 t10k images are the client pool and the "
        "5,000 CSV images the server test split.",
    )
    num_clients: int = Field(100, ge=1, description="Number of clients sharing the pool.")

    @field_validator("path")
    @classmethod
    def _path_holds_mnist(cls, value: str) -> str:
        # Resolve now, against the working directory the scenario was read in, so Ray
        # workers with another working directory find the same folder.
        find_mnist_files(value)
        return str(Path(value).resolve())

    def load(self, *, seed: int) -> Federation:
        """Read the files, scale to [0, 1], partition the pool, split each client locally.

        Unreadable or malformed files raise :class:`ScenarioError` at ``data.path``.
        Randomness as :func:`fedsim.data.federation.build_federation`.
        """
        try:
            x_pool, y_pool, x_test, y_test = load_mnist_arrays(self.path)
        except ValueError as exc:
            raise ScenarioError([("data.path", str(exc))]) from exc
        return build_federation(
            _scale(x_pool),
            y_pool,
            _scale(x_test),
            y_test,
            partition=self.partition,
            num_clients=self.num_clients,
            client_test_fraction=self.client_test_fraction,
            num_classes=NUM_CLASSES,
            seed=seed,
        )
