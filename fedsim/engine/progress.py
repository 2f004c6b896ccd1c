"""Progress display for long runs: a rich progress bar plus one line per logged round."""

from __future__ import annotations

import math
import sys
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


class RunProgress:
    """Shows rounds done / total and the latest accuracy; silent when disabled (tests, --quiet)."""

    def __init__(self, label: str, total: int, enabled: bool = True) -> None:
        self.label = label
        self.total = total
        self.enabled = enabled
        self.console = Console(stderr=True)
        self._progress: Progress | None = None
        self._task = None

    def __enter__(self) -> "RunProgress":
        if self.enabled:
            self._progress = Progress(
                TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[status]}"), TimeElapsedColumn(),
                console=self.console, transient=False, disable=not sys.stderr.isatty(),
            )
            self._progress.__enter__()
            self._task = self._progress.add_task(self.label, total=self.total, status="starting")
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._progress is not None:
            self._progress.__exit__(*exc)
            self._progress = None

    def set_total(self, total: int) -> None:
        self.total = total
        if self._progress is not None:
            self._progress.update(self._task, total=total)

    def update(self, row: dict) -> None:
        if not self.enabled:
            return
        acc = row.get("accuracy")
        acc_text = f"acc {acc:.4f}" if isinstance(acc, float) and not math.isnan(acc) else "acc -"
        worst = row.get("client_acc_min")
        if isinstance(worst, float) and not math.isnan(worst):
            acc_text += f" (worst client {worst:.4f})"
        status = f"{acc_text}  up {_fmt_bytes(row.get('bytes_up', 0))}  {row.get('seconds', 0):.1f}s"
        if self._progress is not None:
            self._progress.update(self._task, completed=min(row["round"], self.total), status=status)
        if self._progress is None or self._progress.disable:
            self.console.print(f"[{self.label}] round {row['round']}/{self.total}  {status}", highlight=False)
