"""README.md stays true: its scenario reference is the generated one."""

from pathlib import Path

from fedsim.reference import BEGIN, END, render

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_scenario_reference_is_current():
    text = README.read_text(encoding="utf-8")
    start, end = text.index(BEGIN), text.index(END) + len(END)
    assert text[start:end] == render(), "run: python -m fedsim.reference, paste into README.md"


def test_readme_names_the_two_setup_commands():
    text = README.read_text(encoding="utf-8")
    assert "pip install torch==2.13.0 && pip install -e . && fedsim run" in text
    assert "pip install torch==2.13.0 && pip install -e '.[test]' && pytest" in text
