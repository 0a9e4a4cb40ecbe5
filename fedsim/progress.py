"""Live progress: a rich bar on a terminal, one plain line per round otherwise."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any, TextIO

if TYPE_CHECKING:
    from fedsim.scenario import Scenario


def _fmt(v: float | None, spec: str = ".4f") -> str:
    return "-" if v is None else format(v, spec)


def headline(rec: dict[str, Any]) -> tuple[float | None, float | None]:
    """(accuracy, loss): centralized when there is one, else the clients' view."""
    if rec.get("eval_accuracy") is not None:
        return rec["eval_accuracy"], rec.get("eval_loss")
    return rec.get("client_eval_accuracy"), rec.get("client_eval_loss")


def start_line(scn: Scenario, where: str) -> str:
    """The line a run starts with: the scenario in brief, then ``where`` it runs."""
    return (
        f"fedsim: {scn.run.name}: {scn.num_clients} clients, {scn.train_cohort} per round, "
        f"{scn.run.rounds} rounds, strategy {scn.strategy.name}, {where}"
    )


def round_line(rec: dict[str, Any], total: int) -> str:
    acc, loss = headline(rec)
    return (
        f"round {rec['round']}/{total}  accuracy {_fmt(acc)}  loss {_fmt(loss)}  "
        f"train_loss {_fmt(rec.get('train_loss'))}  "
        f"clients {rec['clients_replied']}/{rec['clients_selected']}  "
        f"{rec['round_wall_s']:.2f}s"
    )


class Progress:
    def __init__(self, total_rounds: int, *, quiet: bool = False, stream: TextIO | None = None):
        self.total = total_rounds
        self.quiet = quiet
        self.stream = stream or sys.stdout
        self._rich = None
        self._task = None

    def __enter__(self) -> Progress:
        if not self.quiet and self.stream.isatty():
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
            from rich.progress import Progress as RichProgress

            self._rich = RichProgress(
                TextColumn("round"),
                MofNCompleteColumn(),
                BarColumn(),
                TextColumn("{task.fields[status]}"),
                TimeElapsedColumn(),
                console=Console(file=self.stream),
                transient=False,
            )
            self._rich.__enter__()
            self._task = self._rich.add_task("run", total=self.total, status="starting")
        return self

    def update(self, rec: dict[str, Any]) -> None:
        if self.quiet:
            return
        if self._rich is not None:
            acc, loss = headline(rec)
            self._rich.update(
                self._task, completed=rec["round"], status=f"accuracy {_fmt(acc)} loss {_fmt(loss)}"
            )
        else:
            print(round_line(rec, self.total), file=self.stream, flush=True)

    def message(self, text: str) -> None:
        if self.quiet:
            return
        if self._rich is not None:
            self._rich.console.print(text)
        else:
            print(text, file=self.stream, flush=True)

    def __exit__(self, *exc: object) -> None:
        if self._rich is not None:
            self._rich.__exit__(None, None, None)
