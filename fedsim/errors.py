"""Errors meant for people: each names the scenario key path it is about."""

from __future__ import annotations


class ScenarioError(Exception):
    """One or more problems with a scenario, each as (key path, message).

    The CLI prints one ``path: message`` line per problem and exits with code 2.
    """

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        self.problems = list(problems)
        super().__init__("; ".join(f"{p}: {m}" if p else m for p, m in self.problems))

    def lines(self) -> list[str]:
        return [f"{p}: {m}" if p else m for p, m in self.problems]
