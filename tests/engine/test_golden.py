"""Golden numbers: the quickstart scenario's final accuracy and model, pinned, on both
engines. They hold for the library versions below (float arithmetic differs between
torch and numpy builds); with other versions the test says so and is skipped."""

from __future__ import annotations

import hashlib
from importlib import metadata

import pytest
from safetensors.numpy import load_file

from fedsim.runner import execute
from fedsim.scenario import load_scenario

PINNED_VERSIONS = {"torch": "2.13.0+cpu", "numpy": "2.4.6", "safetensors": "0.8.0"}
FINAL_ACCURACY = 0.9303621169916435  # centralized, after 30 rounds
FINAL_LOSS = 0.35783203465028723
MODEL_SHA256 = "a6f3fe22f502cd88c500f8837b07e3a56ca29b2c6b3ef33ec1293bb025b73215"
# The weights alone (name, dtype, shape and bytes of each array, by name): independent of
# how safetensors lays out the file.
WEIGHTS_SHA256 = "0ca4dcc9b07299be3e87064aab0d5c9f29cf42b298b968d5f881919051a13634"


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
    res = execute(load_scenario(None, [f"simulation.engine={engine}"]), out=tmp_path / "q")
    assert res.summary["rounds_completed"] == 30
    assert res.summary["eval_accuracy"] == FINAL_ACCURACY
    assert res.summary["eval_loss"] == FINAL_LOSS
    assert weights_sha256(res.out_dir / "model.safetensors") == WEIGHTS_SHA256
    assert res.summary["model_sha256"] == MODEL_SHA256
