"""Scenario fuzzing: whatever a scenario file holds, ``fedsim validate`` either accepts it
or exits 2 with lines that each name the file (and the key); never a traceback, never
exit 1. Inputs are the shipped scenarios with keys set to hostile values, unknown keys,
tables replaced by scalars, deep nesting, invalid UTF-8 and random bytes."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
import tomli_w
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedsim.cli import main
from fedsim.scenario import load_scenario

REPO = Path(__file__).resolve().parent.parent
BASES = [
    None,  # the embedded quickstart
    REPO / "scenarios" / "churn_markov.toml",
    REPO / "scenarios" / "fedprox_synthetic.toml",
    REPO / "scenarios" / "bench_tiny.toml",
]


def _raw(base: Path | None) -> dict:
    return load_scenario(base).model_dump(mode="json", exclude_none=True)


def _paths(tree: dict, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    out = []
    for k, v in tree.items():
        out.append((*prefix, k))
        if isinstance(v, dict):
            out += _paths(v, (*prefix, k))
    return out


RAWS = [_raw(b) for b in BASES]
PATHS = sorted({p for raw in RAWS for p in _paths(raw)})

HOSTILE = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([0, -1, 1, 2**31, 2**63, 10**11, 10**12, 10**23]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([float("inf"), float("-inf"), float("nan"), 1e-300, 1e300, 1e23]),
    st.text(max_size=12),
    st.sampled_from(["0.05", "", "fedavg", "../../etc/passwd", "inf", "mnist", "trace"]),
    st.booleans(),
    st.lists(st.integers(min_value=-3, max_value=10**11), max_size=4),
    st.lists(st.text(max_size=4), max_size=3),
    st.dictionaries(st.text(max_size=6), st.integers(), max_size=2),
)


def _set(raw: dict, path: tuple[str, ...], value) -> None:
    cur = raw
    for p in path[:-1]:
        nxt = cur.get(p)
        if not isinstance(nxt, dict):
            nxt = cur[p] = {}
        cur = nxt
    cur[path[-1]] = value


@st.composite
def scenario_text(draw) -> bytes:
    raw = draw(st.sampled_from(RAWS))
    raw = tomllib.loads(tomli_w.dumps(raw))  # a deep copy
    for _ in range(draw(st.integers(min_value=1, max_value=3))):
        kind = draw(st.sampled_from(["set", "set", "set", "unknown", "table", "drop"]))
        path = draw(st.sampled_from(PATHS))
        if kind == "set":
            _set(raw, path, draw(HOSTILE))
        elif kind == "unknown":
            _set(raw, (*path[:-1], draw(st.text(min_size=1, max_size=8))), 1)
        elif kind == "table":
            _set(raw, path[:1], draw(HOSTILE))
        else:
            raw.pop(path[0], None)
    return tomli_w.dumps(raw).encode("utf-8")


def _check(tmp_path: Path, data: bytes, capsys) -> None:
    path = tmp_path / "fuzz.toml"
    path.write_bytes(data)
    capsys.readouterr()
    rc = main(["validate", str(path)])
    err = capsys.readouterr().err
    assert rc in (0, 2), (rc, err, data[:400])
    assert "Traceback" not in err
    if rc == 2:
        lines = err.strip().splitlines()
        assert lines and all(line.startswith(f"{path}: ") for line in lines), err


FUZZ = settings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    derandomize=True,  # the same examples every run: a CI failure reproduces
)


@FUZZ
@given(data=scenario_text())
def test_mutated_scenarios_validate_or_exit_2(tmp_path, capsys, data):
    _check(tmp_path, data, capsys)


@FUZZ
@given(data=st.binary(max_size=200))
def test_random_bytes_exit_2(tmp_path, capsys, data):
    _check(tmp_path, data, capsys)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"# only a comment\n",
        b"\xff\xfe[run]\n",
        b'[run]\nname = "\xc3\x28"\n',
        b"x = " + b"[" * 5000 + b"]" * 5000 + b"\n",
        b"[" + b"a." * 3000 + b"b]\n",
        b"[model]\nname = 'mlp'\nhidden = [100000000000]\n",
        b"[run]\nrounds = 1e23\n",
        b"[client]\nlr = inf\n",
        b"[client]\nlr = '0.05'\n",
        b"[coordinator]\nmax_wait_s = 1e12\nwait_step_s = 1e-9\n",
        b"[data]\nnum_clients = 100000000000\n",
    ],
)
def test_hostile_files_exit_2_with_one_line_per_problem(tmp_path, capsys, data):
    path = tmp_path / "fuzz.toml"
    path.write_bytes(data)
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.startswith(f"{path}: ")


def test_an_empty_run_table_asks_for_every_default(tmp_path, capsys):
    path = tmp_path / "defaults.toml"
    path.write_text("[run]\n")
    assert main(["validate", str(path)]) == 0
