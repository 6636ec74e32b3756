"""The hosted leaderboard page: each team's best submission on the visible part of the evaluation cases.

While a phase is open the page ranks on the public part; once the host closes the last phase, final ranks use the
private part (scores on it were computed all along, but never shown). Only team names and aggregate scores appear.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

from sqlalchemy import select

from bench.io import atomic_path
from bench.service import db
from bench.service.host import Host


def leaderboard(host: Host) -> dict[str, Any]:
    """Rows of the visible part, best submission per team, ranked."""
    with host.sessions() as s:
        part, phase = db.visible_part(s)
        rows = s.execute(
            select(
                db.Team.name,
                db.Submission.id,
                db.Submission.kind,
                db.Submission.finished_at,
                db.Submission.summary,
                db.Score,
            )
            .join(db.Submission, db.Submission.team_id == db.Team.id)
            .join(db.Score, db.Score.submission_id == db.Submission.id)
            .where(db.Submission.status == db.SCORED, db.Score.part == part)
        ).all()
    best: dict[str, dict[str, Any]] = {}
    not_ranked: dict[str, dict[str, Any]] = {}
    hib = True
    metric = host.task.metrics.primary
    for team, sid, kind, finished, summary, sc in rows:
        if sc.value is None:
            continue
        excluded = (summary or {}).get("excluded")
        if (
            excluded
        ):  # the eligibility rule (service.yaml `eligibility`): listed with the reason, never ranked
            not_ranked[team] = {"team": team, "submission": sid, "reason": str(excluded)}
            continue
        hib, metric = sc.higher_is_better, sc.metric
        entry = {
            "team": team,
            "submission": sid,
            "kind": kind,
            "scored_at": finished,
            "value": sc.value,
            "ci_low": sc.ci_low,
            "ci_high": sc.ci_high,
            "n_cases": sc.n_cases,
        }
        cur = best.get(team)
        better = cur is None or (sc.value > cur["value"] if hib else sc.value < cur["value"])
        if better:
            best[team] = entry
    ranked = sorted(best.values(), key=lambda e: (-e["value"] if hib else e["value"], e["scored_at"] or 0))
    for i, e in enumerate(ranked, 1):
        e["rank"] = i
    return {
        "title": host.settings.title,
        "task": {"name": host.task.name, "version": host.task.version},
        "phase": phase.name if phase else None,
        "phase_open": phase is None or phase.closed_at is None,
        "part": part,
        "metric": metric,
        "higher_is_better": hib,
        "rows": ranked,
        "not_ranked": [v for k, v in sorted(not_ranked.items()) if k not in best],
    }


def _fmt(x: float | None) -> str:
    return "–" if x is None else f"{x:.3f}"


def render_page(board: dict[str, Any]) -> str:
    e = html.escape
    state = (
        f"phase {e(str(board['phase']))} open: ranks on the public part of the evaluation cases"
        if board["phase_open"]
        else f"phase {e(str(board['phase']))} closed: final ranks on the private part of the evaluation cases"
    )
    rows = "\n".join(
        f"<tr><td>{r['rank']}</td><td>{e(r['team'])}</td><td>{e(r['kind'])}</td>"
        f"<td>{_fmt(r['value'])}</td><td>[{_fmt(r['ci_low'])}, {_fmt(r['ci_high'])}]</td>"
        f"<td>{r['n_cases']}</td></tr>"
        for r in board["rows"]
    )
    if not rows:
        rows = '<tr><td colspan="6">no scored submissions yet</td></tr>'
    excluded = "".join(
        f"<li>{e(r['team'])} ({e(r['submission'])}): {e(r['reason'])}</li>"
        for r in board.get("not_ranked", [])
    )
    excluded = f'<h2>Not ranked</h2>\n<ul id="not-ranked">{excluded}</ul>' if excluded else ""
    arrow = "higher is better" if board["higher_is_better"] else "lower is better"
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{e(board["title"])}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2rem; }}
table {{ border-collapse: collapse; }} td, th {{ border-bottom: 1px solid #ddd; padding: .3rem .8rem; }}
.note {{ color: #555; }}
</style></head>
<body>
<h1>{e(board["title"])}</h1>
<p class="note">Task {e(board["task"]["name"])} {e(board["task"]["version"])}. {state}.
Scored by the host on data that never leaves it; {e(board["metric"])}, {arrow}, with a 95% patient bootstrap
interval.</p>
<table id="board" data-part="{e(board["part"])}">
<thead><tr><th>rank</th><th>team</th><th>submission</th><th>{e(board["metric"])}</th><th>95% CI</th>
<th>cases</th></tr></thead>
<tbody>
{rows}
</tbody></table>
{excluded}
</body></html>
"""


def write_page(host: Host) -> Path:
    """Rebuild the static copy of the page (storage/page/index.html), for hosting it elsewhere too."""
    out = host.page_dir / "index.html"
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        Path(tmp).write_text(render_page(leaderboard(host)), encoding="utf-8")
    return out
