"""Golden numbers: the quickstart scenario's final accuracy and model, pinned, on both
engines. They hold for the library versions below and the CPU kernels torch dispatches
to (float arithmetic differs between torch and numpy builds, and between torch's AVX2
and AVX512 kernels); with other versions or kernels the test says so and is skipped.
To reproduce the AVX2 numbers on an AVX512 machine: ATEN_CPU_CAPABILITY=avx2."""

from __future__ import annotations

import hashlib
from importlib import metadata
from typing import NamedTuple

import pytest
import torch
from safetensors.numpy import load_file

from fedsim.runner import execute
from fedsim.scenario import load_scenario

PINNED_VERSIONS = {"torch": "2.13.0+cpu", "numpy": "2.4.6", "safetensors": "0.8.0"}


class Golden(NamedTuple):
    accuracy: float  # centralized, after 30 rounds
    loss: float
    model_sha256: str
    # The weights alone (name, dtype, shape and bytes of each array, by name):
    # independent of how safetensors lays out the file.
    weights_sha256: str


GOLDEN = {  # by torch.backends.cpu.get_cpu_capability()
    "AVX2": Golden(
        0.9303621169916435,
        0.35783203465028723,
        "a6f3fe22f502cd88c500f8837b07e3a56ca29b2c6b3ef33ec1293bb025b73215",
        "0ca4dcc9b07299be3e87064aab0d5c9f29cf42b298b968d5f881919051a13634",
    ),
    "AVX512": Golden(
        0.9303621169916435,
        0.35783199214669653,
        "7fe5af3af1ac7dbf5f9f82e2e8c171d99900ba83c42b61b25de24475f3d8273d",
        "1f885813ce70fc572aa523ad08c638c49bc0b211294057e4a4dd40265ffde251",
    ),
}


def _versions() -> dict[str, str]:
    out = {}
    for dist in PINNED_VERSIONS:
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "missing"
    return out


def weights_sha256(path) -> str:
    h = hashlib.sha256()
    for name, a in sorted(load_file(str(path)).items()):
        h.update(f"{name}|{a.dtype.str}|{a.shape}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()


@pytest.mark.parametrize("engine", ["fedsim", "flower"])
def test_quickstart_golden_numbers(tmp_path, ray_cluster, engine):
    if _versions() != PINNED_VERSIONS:
        pytest.skip(f"golden numbers pinned for {PINNED_VERSIONS}, found {_versions()}")
    kernels = torch.backends.cpu.get_cpu_capability()
    if kernels not in GOLDEN:
        pytest.skip(f"golden numbers pinned for CPU kernels {sorted(GOLDEN)}, found {kernels}")
    gold = GOLDEN[kernels]
    res = execute(load_scenario(None, [f"simulation.engine={engine}"]), out=tmp_path / "q")
    assert res.summary["rounds_completed"] == 30
    assert res.summary["eval_accuracy"] == gold.accuracy
    assert res.summary["eval_loss"] == gold.loss
    assert weights_sha256(res.out_dir / "model.safetensors") == gold.weights_sha256
    assert res.summary["model_sha256"] == gold.model_sha256
