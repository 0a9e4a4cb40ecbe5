"""A client machine's own data folder (``fedsim node --data DIR``): the real deployment
case, a hospital's files that never leave its machine.

The folder holds ``train.npz`` and, optionally, ``test.npz`` (the client's held-out
data for local evaluation), each with two arrays: ``x`` (the inputs, shape
``(n, *input_shape)``, any real or integer dtype; fedsim trains on float32) and ``y``
(integer class labels in ``range(num_classes)``, shape ``(n,)``). They are read with
``allow_pickle=False``: an ``.npz`` holding Python objects is refused, never unpickled.
``fedsim export`` writes a partition of a scenario's dataset in this form, which is
how a deployment with local folders is checked against its simulation.

The scenario's ``[data]`` table still says what the model expects (``input_shape``,
the number of classes); a folder that does not match is refused by the node, naming
the file and what differs.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["LocalData", "LocalDataError", "export_client", "load_local_data"]

SPLITS = ("train", "test")


class LocalDataError(ValueError):
    """A data folder that cannot be used; the message names the file and the problem."""


@dataclass(frozen=True, eq=False)
class LocalData:
    """One client's own examples: train (and possibly empty test) arrays, read-only."""

    folder: Path
    x: np.ndarray  # float32 (n, *input_shape)
    y: np.ndarray  # int64 (n,)
    x_test: np.ndarray
    y_test: np.ndarray

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x.shape[1:])

    def check(self, input_shape: tuple[int, ...], num_classes: int) -> None:
        """LocalDataError unless the folder fits a model of ``input_shape`` inputs and
        ``num_classes`` classes."""
        for split, x, y in (("train", self.x, self.y), ("test", self.x_test, self.y_test)):
            where = self.folder / f"{split}.npz"
            if len(y) and tuple(x.shape[1:]) != tuple(input_shape):
                raise LocalDataError(
                    f"{where}: x has examples of shape {list(x.shape[1:])}; the scenario's "
                    f"model takes {list(input_shape)} (data.input_shape)"
                )
            if len(y) and int(y.max()) >= num_classes:
                raise LocalDataError(
                    f"{where}: label {int(y.max())} is not a class of the scenario "
                    f"({num_classes} classes, labels 0..{num_classes - 1})"
                )


def _read(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as npz:
            keys = set(npz.files)
            if keys != {"x", "y"}:
                raise LocalDataError(
                    f"{path}: holds arrays {sorted(keys)}; expected exactly 'x' and 'y'"
                )
            x, y = npz["x"], npz["y"]
    except LocalDataError:
        raise
    except ValueError as e:  # object arrays (allow_pickle=False), a damaged member
        raise LocalDataError(f"{path}: cannot be read without unpickling ({e})") from None
    except (OSError, zipfile.BadZipFile, EOFError) as e:
        raise LocalDataError(f"{path}: not a readable .npz file ({e})") from None
    if x.dtype.kind not in "fiub" or x.ndim < 2:
        raise LocalDataError(
            f"{path}: x must be a numeric array of shape (n, *input_shape); "
            f"got dtype {x.dtype}, shape {list(x.shape)}"
        )
    if y.dtype.kind not in "iu" or y.ndim != 1:
        raise LocalDataError(
            f"{path}: y must be integer class labels of shape (n,); "
            f"got dtype {y.dtype}, shape {list(y.shape)}"
        )
    if len(x) != len(y):
        raise LocalDataError(f"{path}: x has {len(x)} examples and y {len(y)} labels")
    xf = np.ascontiguousarray(x, dtype=np.float32)
    if not np.isfinite(xf).all():
        raise LocalDataError(f"{path}: x has non-finite values (NaN or Inf)")
    if len(y) and int(y.min()) < 0:
        raise LocalDataError(f"{path}: y has a negative label ({int(y.min())})")
    yi = np.ascontiguousarray(y, dtype=np.int64)
    for a in (xf, yi):
        a.flags.writeable = False
    return xf, yi


def load_local_data(folder: str | Path) -> LocalData:
    """Read and check a data folder; LocalDataError names what is wrong and where."""
    root = Path(folder)
    if not root.is_dir():
        raise LocalDataError(f"{root}: not a folder")
    train = root / "train.npz"
    if not train.is_file():
        raise LocalDataError(f"{train}: missing (a data folder needs train.npz with x and y)")
    x, y = _read(train)
    if len(y) == 0:
        raise LocalDataError(f"{train}: has no examples")
    test = root / "test.npz"
    if test.is_file():
        xt, yt = _read(test)
        if len(yt) and xt.shape[1:] != x.shape[1:]:
            raise LocalDataError(
                f"{test}: examples of shape {list(xt.shape[1:])}, but train.npz's are "
                f"{list(x.shape[1:])}"
            )
    else:
        xt, yt = np.zeros((0, *x.shape[1:]), np.float32), np.zeros(0, np.int64)
    return LocalData(root.resolve(), x, y, xt, yt)


def export_client(
    train: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray], folder: Path
) -> None:
    """Write one client's data as a data folder (``train.npz``, ``test.npz``). The
    folder must not exist yet; it appears whole or not at all (written aside, renamed)."""
    folder = Path(folder)
    if folder.exists():
        raise LocalDataError(f"{folder}: exists already (nothing was written)")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(f".{folder.name}.partial")
    tmp.mkdir()
    try:
        for split, (x, y) in zip(SPLITS, (train, test), strict=True):
            np.savez(tmp / f"{split}.npz", x=np.asarray(x), y=np.asarray(y))
        tmp.rename(folder)
    except BaseException:
        for f in tmp.glob("*"):
            f.unlink()
        tmp.rmdir()
        raise
