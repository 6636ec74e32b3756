from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction, groups: dict) -> None:
    p = sub.add_parser("host", help="set up the hosted service: database, answer key, teams, tokens, phases")
    hs = p.add_subparsers(dest="host_command", metavar="HOST_COMMAND")
    p.set_defaults(func=lambda a: (p.print_help(), 2)[1])

    def add(name: str, help_: str, func) -> argparse.ArgumentParser:  # noqa: ANN001
        q = hs.add_parser(name, help=help_)
        q.add_argument("--config", required=True, type=Path, help="service.yaml")
        q.set_defaults(func=func)
        return q

    q = add("init", "create the database tables and build the answer key from the real manifest", cmd_init)
    q.add_argument("--rebuild-key", action="store_true", help="build the answer key again even if it exists")
    q = add("team-add", "register a team and print its first API token (shown once)", cmd_team_add)
    q.add_argument("name")
    q = add("token-add", "issue another API token for a team (shown once)", cmd_token_add)
    q.add_argument("team")
    q = add(
        "token-revoke",
        "revoke the token(s) starting with PREFIX (as `host teams` shows it)",
        cmd_token_revoke,
    )
    q.add_argument("prefix")
    add("teams", "list teams and their token prefixes", cmd_teams)
    q = add(
        "phase-open",
        "open a phase: the page ranks on the public part of the evaluation cases",
        cmd_phase_open,
    )
    q.add_argument("name")
    q = add("phase-close", "close the open phase: final ranks on the private part", cmd_phase_close)


def _host(args: argparse.Namespace):  # noqa: ANN202
    from bench.service.host import Host

    h = Host.from_file(args.config)
    h.init()
    return h


def cmd_init(args: argparse.Namespace) -> int:
    from bench.service.scoring import build_key, write_key

    h = _host(args)
    st = h.settings
    # A segmentation key without its masks file (e.g. built by an earlier version) is built again.
    complete = st.answer_key.exists() and (
        not h.task.is_segmentation or (st.answer_key_masks is not None and st.answer_key_masks.exists())
    )
    if complete and not args.rebuild_key:
        print(f"answer key {st.answer_key} exists (pass --rebuild-key to build it again)")
    else:
        # A segmentation key's masks at the protocol's preset: the resolution the service's runs predict at.
        key = build_key(
            st.real_manifest,
            h.task,
            st.id_salt,
            st.private_fraction,
            image_size=st.protocol.preset,
            cache_dir=h.cache,
        )
        write_key(key, st.answer_key, st.answer_key_masks)
        parts = key.df["part"].value_counts().to_dict()
        print(f"wrote answer key {st.answer_key}: {len(key.df)} cases ({parts})")
        if key.is_segmentation:
            h_, w_ = key.image_size or (0, 0)
            print(f"wrote its truth label maps {st.answer_key_masks} ({h_} x {w_})")
    print(f"database ready: {st.database.split('@')[-1]}")
    return 0


def cmd_team_add(args: argparse.Namespace) -> int:
    from sqlalchemy import select

    from bench.errors import BadInput
    from bench.service import db

    h = _host(args)
    with h.sessions() as s, s.begin():
        if s.execute(select(db.Team).where(db.Team.name == args.name)).scalar_one_or_none():
            raise BadInput(f"team {args.name!r} already exists (issue another token with `host token-add`)")
        token = db.issue_token(s, db.add_team(s, args.name))
    print(f"team {args.name} registered; API token (shown once, keep it secret):\n{token}")
    return 0


def cmd_token_add(args: argparse.Namespace) -> int:
    from sqlalchemy import select

    from bench.errors import BadInput
    from bench.service import db

    h = _host(args)
    with h.sessions() as s, s.begin():
        team = s.execute(select(db.Team).where(db.Team.name == args.team)).scalar_one_or_none()
        if team is None:
            raise BadInput(f"team {args.team!r}: not registered (`medsynbench host team-add NAME`)")
        token = db.issue_token(s, team)
    print(token)
    return 0


def cmd_token_revoke(args: argparse.Namespace) -> int:
    from bench.errors import BadInput
    from bench.service import db

    h = _host(args)
    with h.sessions() as s, s.begin():
        n = db.revoke_tokens(s, args.prefix)
    if not n:
        raise BadInput(f"no active token starts with {args.prefix!r}")
    print(f"revoked {n} token(s)")
    return 0


def cmd_teams(args: argparse.Namespace) -> int:
    from sqlalchemy import select

    from bench.service import db

    h = _host(args)
    with h.sessions() as s:
        for team in s.execute(select(db.Team).order_by(db.Team.name)).scalars():
            toks = s.execute(select(db.Token).where(db.Token.team_id == team.id)).scalars()
            shown = ", ".join(f"{t.prefix}...{' (revoked)' if t.revoked_at else ''}" for t in toks)
            print(f"{team.name}: {shown}")
    return 0


def cmd_phase_open(args: argparse.Namespace) -> int:
    from bench.errors import BadInput
    from bench.service import db

    h = _host(args)
    with h.sessions() as s, s.begin():
        cur = db.open_phase(s)
        if cur is not None:
            raise BadInput(f"phase {cur.name!r} is still open; close it first (`host phase-close`)")
        s.add(db.Phase(name=args.name, opened_at=db.now()))
    print(f"phase {args.name} open")
    return 0


def cmd_phase_close(args: argparse.Namespace) -> int:
    from bench.errors import BadInput
    from bench.service import db
    from bench.service.pages import write_page

    h = _host(args)
    with h.sessions() as s, s.begin():
        cur = db.open_phase(s)
        if cur is None:
            raise BadInput("no phase is open")
        cur.closed_at = db.now()
        name = cur.name
    write_page(h)
    print(f"phase {name} closed: the page now shows final ranks on the private part")
    return 0
