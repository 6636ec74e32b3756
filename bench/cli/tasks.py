from __future__ import annotations

import argparse

from bench.tasks import list_tasks, load_task


def register(sub: argparse._SubParsersAction, groups: dict) -> None:
    p = sub.add_parser("tasks", help="list tasks (name, version, classes, sites)")
    p.add_argument("--task", help="show one task (name, folder or task.yaml) in full")
    p.set_defaults(func=cmd_tasks)


def cmd_tasks(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if args.task:
        import yaml

        t = load_task(args.task)
        console.print(yaml.safe_dump(t.spec(), sort_keys=False))
        return 0
    table = Table(title="medsynbench tasks")
    for col in ("name", "version", "kind", "modality", "classes", "train sites", "external sites"):
        table.add_column(col)
    for t in list_tasks():
        table.add_row(
            t.name,
            t.version,
            t.kind,
            t.modality,
            ", ".join(t.classes),
            ", ".join(t.sites.train),
            ", ".join(t.sites.external) or "none",
        )
    console.print(table)
    return 0
