"""status: the latest run of each stage and split, and whether it is done, stale, running, killed or failed; the
stages of `igcam run`'s chain that have not run yet are listed as such. A run still marked running whose process
on this host is gone (SIGKILL, a crash, a lost node's job killed by the scheduler) shows as killed."""

from __future__ import annotations

import os
import socket

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from igcam_cli.registry import chain_stages
from igcam_cli.workspace import Workspace


def run(ws: Workspace) -> list[dict]:
    records = ws.records()
    latest: dict[tuple, dict] = {}
    for record in records:
        stage = record["stage"]
        if stage == "evaluate":  # one row per evaluated artifact
            stage = f"evaluate {record['config'].get('artifact')}"
        latest[(stage, record.get("split"), record.get("shard"))] = record
    rows = []
    for (stage, split, shard), record in latest.items():
        state = record["status"]
        if state == "done" and ws.is_stale(record):
            state = "stale"
        elif state == "running" and _process_gone(record):
            state = "killed"
        rows.append({"stage": stage, "split": split, "shard": shard, "state": state, "record": record})
    ran = {record["stage"] for record in records}
    for stage in chain_stages(ws):
        if stage not in ran and stage != "evaluate":
            rows.append({"stage": stage, "split": None, "shard": None, "state": "not run", "record": {}})
    table = Table(title=escape(f"igcam workspace {ws.root}"))
    for column in ("stage", "split", "shard", "status", "ended", "metrics"):
        table.add_column(column, no_wrap=column != "metrics")
    style = {"done": "green", "stale": "yellow", "running": "cyan", "failed": "red", "killed": "red", "not run": "dim"}
    for row in rows:
        record = row["record"]
        metrics = ", ".join(f"{k} {_fmt(v)}" for k, v in record.get("metrics", {}).items())
        ended = (record.get("ended") or "-")[:16].replace("T", " ")
        table.add_row(
            row["stage"],
            escape(row["split"] or "-"),
            escape(row["shard"] or "-"),
            f"[{style[row['state']]}]{row['state']}[/]",
            ended,
            escape(metrics or record.get("error", "") or _killed_note(row)),
        )
    if not ran:
        table.caption = "no stage has run yet"
    Console(width=max(120, Console().width)).print(table)
    return rows


def _fmt(value) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _process_gone(record: dict) -> bool:
    """Whether the run's process, on this host, no longer exists (a run on another host cannot be checked)."""
    pid = record.get("pid")
    if record.get("host") != socket.gethostname() or not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # e.g. another user's process: it exists
        return False
    return False


def _killed_note(row: dict) -> str:
    if row["state"] != "killed":
        return ""
    return f"process {row['record']['pid']} is gone; rerun the stage to resume it"
