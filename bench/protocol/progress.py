"""The matrix's progress display: runs done / total with an ETA; epoch bars of in-process runs nest inside."""

from __future__ import annotations

from typing import Any


class RunProgress:
    def __init__(self, enabled: bool, total: int, done: int, console: Any):
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.console = console
        self.p = (
            Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TextColumn("ETA"),
                TimeRemainingColumn(),
                console=console,
                transient=False,
            )
            if enabled
            else None
        )
        if self.p is not None:
            self.task = self.p.add_task("runs", total=total, completed=done)

    @property
    def inner(self) -> Any:
        """What a run gets as `progress`: the shared rich Progress, or False."""
        return self.p if self.p is not None else False

    def __enter__(self) -> RunProgress:
        if self.p is not None:
            self.p.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.p is not None:
            self.p.stop()

    def note(self, text: str) -> None:
        self.console.print(text)

    def run_done(self, rid: str, res: dict[str, Any]) -> None:
        if self.p is not None:
            self.p.advance(self.task)
        m = res.get("metrics") or {}
        primary = m.get("primary", "auroc_macro")
        auc = m.get(primary) or {}
        parts = " ".join(f"{k} {v:.3f}" for k, v in auc.items() if v is not None)
        label = {"auroc_macro": "AUROC", "dice_macro": "Dice"}.get(primary, primary)
        self.console.print(f"done {rid} {res.get('seconds', 0):.1f}s {label} {parts}", soft_wrap=True)
