"""Operator CLI: ``python -m api.cli keys create|list|revoke`` and ``python -m api.cli migrate``."""

from __future__ import annotations

import argparse
import sys
from datetime import timedelta
from pathlib import Path

from sqlalchemy import or_, select

from api.core import audit
from api.core.db import session_scope
from api.core.keys import create_key
from api.core.models import ApiKey, Role, utcnow


def migrate(revision: str = "head") -> None:
    """Apply the Alembic migrations to the configured database."""
    from alembic import command
    from alembic.config import Config

    root = Path(__file__).resolve().parents[1]
    command.upgrade(Config(str(root / "alembic.ini")), revision)


def migrate_command(_: argparse.Namespace) -> int:
    migrate()
    return 0


def keys_create(args: argparse.Namespace) -> int:
    expires = utcnow() + timedelta(days=args.days) if args.days else None
    with session_scope() as session:
        row, plain = create_key(session, name=args.name, role=Role(args.role), expires_at=expires)
        audit.record(session, None, "key.create", "api_key", row.id, {"role": row.role, "days": args.days or None})
        print(f"created key {row.id} ({row.role}, {row.name}); store it now, it is not shown again:")
        print(plain)
    return 0


def keys_list(_: argparse.Namespace) -> int:
    with session_scope() as session:
        for row in session.execute(select(ApiKey).order_by(ApiKey.created_at)).scalars():
            state = "revoked" if row.revoked_at else ("expired" if row.expires_at and row.expires_at <= utcnow()
                                                      else "active")
            print(f"{row.id}  {row.prefix}...  {row.role:<11}  {state:<7}  {row.name}")
    return 0


def keys_revoke(args: argparse.Namespace) -> int:
    with session_scope() as session:
        rows = session.execute(select(ApiKey).where(or_(ApiKey.id == args.key, ApiKey.prefix == args.key))
                               ).scalars().all()
        if len(rows) != 1:
            print(f"no single key matches {args.key!r} (give its id or its prefix)", file=sys.stderr)
            return 1
        rows[0].revoked_at = utcnow()
        audit.record(session, None, "key.revoke", "api_key", rows[0].id)
        print(f"revoked {rows[0].id} ({rows[0].name})")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m api.cli", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("migrate", help="apply database migrations").set_defaults(func=migrate_command)
    keys = sub.add_parser("keys", help="manage API keys").add_subparsers(dest="action", required=True)
    create = keys.add_parser("create", help="create a key and print it once")
    create.add_argument("--name", required=True, help="who or what uses the key")
    create.add_argument("--role", required=True, choices=[r.value for r in Role])
    create.add_argument("--days", type=int, default=0, help="expire after this many days (0: never)")
    create.set_defaults(func=keys_create)
    keys.add_parser("list", help="list keys (never the keys themselves)").set_defaults(func=keys_list)
    revoke = keys.add_parser("revoke", help="revoke a key by id or prefix")
    revoke.add_argument("key")
    revoke.set_defaults(func=keys_revoke)
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
