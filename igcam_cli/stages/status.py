"""status: the latest run of each stage and split: done, partial (n of N images), stale (which input ran again),
running, killed or failed (its error line), and the command to run next; the stages of `igcam run`'s chain that
have not run yet are listed as such. A run still marked running whose process on this host is gone (SIGKILL, a
crash, a lost node's job killed by the scheduler) shows as killed."""

from __future__ import annotations

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from igcam_cli.registry import BY_NAME, TRAINED_MODELS, chain_stages
from igcam_cli.workspace import Workspace, process_gone


def run(ws: Workspace) -> list[dict]:
    records = ws.records()
    latest: dict[tuple, dict] = {}
    for record in records:
        stage = record["stage"]
        if stage == "evaluate":  # one row per evaluated artifact
            stage = f"evaluate {record['config'].get('artifact')}"
        latest[(stage, record.get("split"), record.get("shard"))] = record
    dataset = ws.dataset()
    rows = [_row(ws, dataset, stage, split, shard, record) for (stage, split, shard), record in latest.items()]
    ran = {record["stage"] for record in records}
    for stage in chain_stages(ws):
        if stage not in ran and stage != "evaluate":
            rows.append(
                {
                    "stage": stage,
                    "split": None,
                    "shard": None,
                    "state": "not run",
                    "record": {},
                    "detail": "",
                    "next": ws.command(stage),
                }
            )
    _print(ws, rows, caption="no stage has run yet" if not ran else None)
    return rows


def run_state(ws: Workspace, record: dict) -> tuple[str, str]:
    """A run's state as status and the HTML report show it: done, stale, running, killed or failed, and the line
    that explains it ("" for done and running)."""
    state = record["status"]
    if state == "done":
        stale = ws.stale_reason(record)
        return ("stale", stale) if stale is not None else ("done", "")
    if state == "running" and process_gone(record):
        return "killed", f"process {record['pid']} is gone"
    if state == "failed":
        return "failed", record.get("error", "")
    return state, ""


def _row(ws: Workspace, dataset, stage: str, split: str | None, shard: str | None, record: dict) -> dict:
    """The row of a stage's latest run: its state, what explains it, and the command to run next."""
    state, detail = run_state(ws, record)
    name = record["stage"]
    covered = _coverage(ws, dataset, name, split) if name in BY_NAME and BY_NAME[name].per_image else None
    if state == "done" and covered is not None and covered[0] + covered[1] < covered[2]:
        state = "partial"
    if covered is not None and state != "stale":
        done, skipped, total = covered
        images = f"{done} of {total} images" + (f", {skipped} skipped as unreadable" if skipped else "")
        detail = "; ".join(part for part in (images, detail) if part)
    if not detail:
        detail = ", ".join(f"{k} {_fmt(v)}" for k, v in record.get("metrics", {}).items())
    return {
        "stage": stage,
        "split": split,
        "shard": shard,
        "state": state,
        "record": record,
        "detail": detail,
        "next": _next_command(ws, name, split, shard, state, record),
    }


def _coverage(ws: Workspace, dataset, stage: str, split: str | None) -> tuple[int, int, int] | None:
    """(images done, images skipped as unreadable, images of the split) of a map stage's output, now; None where
    the split is not the dataset's."""
    if split is None or split not in dataset.splits():
        return None
    ids = set(dataset.ids(split))
    store = ws.outputs(BY_NAME[stage].writes or "", split)
    return len(store.ids() & ids), len(set(store.skipped()) & ids), len(ids)


def _next_command(ws: Workspace, stage: str, split: str | None, shard: str | None, state: str, record: dict) -> str:
    """What to run: the same command to resume (killed, failed, partial), with --force to redo stale work;
    a map stage's shard and a classifier's round as the run had them."""
    if state in ("done", "running"):
        return ""
    if stage == "evaluate":
        return f"{ws.command('evaluate', split)} --artifact {record['config'].get('artifact')}"
    trains = stage in BY_NAME and BY_NAME[stage].writes in TRAINED_MODELS
    command = ws.command(stage, None if trains else split)
    if shard and shard != "0/1":
        command += f" --shard {shard}"
    if stage == "train-cls" and int(record.get("round") or 1) > 1:
        command += f" --round {record['round']}"
    if state == "stale":
        return f"{command} --force"
    return f"{command} --resume" if trains and state in ("killed", "failed") else command


def _print(ws: Workspace, rows: list[dict], caption: str | None) -> None:
    table = Table(title=escape(f"igcam workspace {ws.root}"), caption=caption)
    for column in ("stage", "split", "shard", "status", "ended", "detail", "next"):
        table.add_column(column, no_wrap=column not in ("detail", "next"))
    style = {
        "done": "green",
        "stale": "yellow",
        "partial": "yellow",
        "running": "cyan",
        "failed": "red",
        "killed": "red",
        "not run": "dim",
    }
    for row in rows:
        ended = (row["record"].get("ended") or "-")[:16].replace("T", " ")
        table.add_row(
            row["stage"],
            escape(row["split"] or "-"),
            escape(row["shard"] or "-"),
            f"[{style[row['state']]}]{row['state']}[/]",
            ended,
            escape(row["detail"]),
            escape(row["next"]),
        )
    Console(width=max(140, Console().width)).print(table)


def _fmt(value) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)
