"""A folder a command is told to write where no folder can be made (under a file, in
/proc) is refused before any work, with one line naming it and why, exit 2, and nothing
written: ``fedsim run --out``, ``fedsim export DIR``, ``fedsim app DIR``,
``fedsim credentials DIR``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from fedsim.errors import ScenarioError
from fedsim.results import cannot_create, check_out_dir

SCENARIO = str(Path(__file__).resolve().parents[1] / "scenarios" / "quickstart.toml")
COMMANDS = {
    "run": lambda d: ["run", SCENARIO, "--out", d, "--set", "run.rounds=1"],
    "export": lambda d: ["export", SCENARIO, d],
    "app": lambda d: ["app", SCENARIO, d],
    "credentials": lambda d: ["credentials", d],
}


def _listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_a_folder_under_a_file_is_refused_before_any_work(tmp_path, command):
    (tmp_path / "afile").write_text("not a folder\n")
    r = subprocess.run(
        [sys.executable, "-m", "fedsim.cli", *COMMANDS[command]("afile/x/y")],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert r.returncode == 2, r.stderr
    prefix = "fedsim: --out" if command == "run" else f"fedsim {command}"
    assert r.stderr.strip().splitlines() == [
        f"{prefix}: cannot create afile/x/y: {tmp_path / 'afile'} is a file, not a folder"
    ]
    assert "round" not in r.stdout  # (no run started)
    assert _listing(tmp_path) == ["afile"]


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc")
def test_a_folder_where_the_file_system_takes_none_is_refused():
    # /proc looks writable to root (its mode bits do not stop root); making a folder
    # there fails all the same, which only trying finds out.
    with pytest.raises(ScenarioError) as e:
        check_out_dir(Path("/proc/fedsim-run"))
    assert e.value.lines() == [
        "--out: cannot create /proc/fedsim-run: no folder can be made in /proc "
        "(No such file or directory)"
    ]


def test_a_folder_that_can_be_made_passes_and_the_probe_leaves_nothing(tmp_path):
    assert cannot_create(tmp_path / "a" / "b" / "c") is None
    check_out_dir(tmp_path / "run")
    assert _listing(tmp_path) == []
