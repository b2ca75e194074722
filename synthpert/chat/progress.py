"""Progress bars (rich) for long stage loops: the chat engine's requests with their cost, evaluation's examples."""

from __future__ import annotations


class CostProgress:
    """The chat engine's bar: requests done and the running cost; silent when stderr is not a terminal."""

    def __init__(self, enabled: bool, description: str, total: int, done: int):
        self.bar = None
        self.description = description
        if not enabled:
            return
        from rich.console import Console

        console = Console(stderr=True)
        if not console.is_terminal:
            return
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                   TimeRemainingColumn)

        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("[green]${task.fields[cost]:.4f}"), TimeElapsedColumn(),
                            TimeRemainingColumn(), console=console)
        self.bar.start()
        self.task = self.bar.add_task(description, total=total, completed=done, cost=0.0)

    def advance(self, cost: float) -> None:
        if self.bar is not None:
            self.bar.update(self.task, advance=1, cost=cost)

    def set(self, done: int, cost: float, note: str) -> None:
        """Absolute progress (the Batch API reports counts per job, not one answer at a time)."""
        if self.bar is not None:
            self.bar.update(self.task, completed=done, cost=cost, description=f"{self.description} · {note}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def count_progress(total: int, done: int, label: str):
    """Evaluation's bar: examples predicted of the total (``done`` already finished); returns (bar, task)."""
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)

    bar = Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(),
                   transient=False)
    task = bar.add_task(label, total=total, completed=done)
    return bar, task
