"""Progress for long work: rich bars on a terminal, plain log lines elsewhere.

Only rank 0 of a distributed run reports. Log lines go to stdout in both modes (tests
and CI read them), bars only where a person watches.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

__all__ = ["Reporter"]


class Reporter:
    def __init__(self, enabled: bool = True, console: Console | None = None) -> None:
        self.enabled = enabled
        self.console = console or Console()

    def log(self, message: str) -> None:
        if self.enabled:
            self.console.print(message, highlight=False, soft_wrap=True)

    @contextmanager
    def task(self, label: str, total: int, completed: int = 0) -> Iterator[Callable[..., None]]:
        """A bar over ``total`` units; the yielded callable advances it by one."""
        if not self.enabled:
            yield lambda **_: None
            return
        if not self.console.is_terminal:
            every = max(1, total // 10)
            state = {"n": completed}

            def advance(**fields: float) -> None:
                state["n"] += 1
                if state["n"] % every == 0 or state["n"] == total:
                    extra = " ".join(f"{k}={v:.4g}" for k, v in fields.items())
                    self.log(f"{label}: {state['n']}/{total} {extra}")

            yield advance
            return
        columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn())
        with Progress(*columns, console=self.console, transient=False) as progress:
            tid = progress.add_task(label, total=total, completed=completed, info="")

            def advance(**fields: float) -> None:
                info = " ".join(f"{k}={v:.4g}" for k, v in fields.items())
                progress.update(tid, advance=1, info=info)

            yield advance
