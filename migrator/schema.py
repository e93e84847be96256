"""A database's schema as plain, comparable data: reflect, fingerprint, compare.

``reflect(connection)`` reads the tables of the connection's default schema with SQLAlchemy's
inspector (``alembic_version`` left out) into a JSON-ready dict::

    {"tables": {"accounts": {
        "columns": {"email": {"type": "VARCHAR(255)", "nullable": false, "default": null}},
        "primary_key": ["id"],
        "indexes": {"ix_...": {"columns": ["account_id"], "unique": false}},
        "unique_constraints": {"uq_accounts_email": {"columns": ["email"]}},
        "foreign_keys": {"fk_...": {"columns": [...], "references": "accounts", ...}}}}}

The form is normalised so that what differs between servers of one provider and has no meaning
for the application does not count: MySQL's integer display widths, collations and character
sets, ``current_timestamp()`` against ``CURRENT_TIMESTAMP`` or ``now()``, PostgreSQL's
``::type`` casts in defaults, the name of a primary key (MySQL calls every one ``PRIMARY``), the
order of columns. ``fingerprint`` hashes that form (sha256 of its canonical JSON), so two
databases with the same schema have the same fingerprint. ``compare`` lists the differences in
words ("extra column accounts.nickname (VARCHAR(50), nullable)").

Not covered: check constraints, triggers, views, comments, and server-specific storage options.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import OrderedDict

from sqlalchemy import inspect
from sqlalchemy.engine import Connection

from migrator import process, providers
from migrator.engines import refresh_default_schema

VERSION_TABLE = "alembic_version"
# Referential actions that mean "no action": servers report them differently, or not at all.
_DEFAULT_ACTIONS = {"NO ACTION", "RESTRICT"}


def reflect(connection: Connection, *, shared=None) -> dict:
    """The normalised schema of ``connection``'s default schema (PostgreSQL's ``public``, the
    MySQL database, SQLite's ``main``), without ``alembic_version``.

    Read with the inspector's ``get_multi_*`` calls: on PostgreSQL one catalog query per kind
    (columns, keys, indexes, ...) for all tables at once, not one per table; the other dialects
    loop over the tables themselves.

    On PostgreSQL one query first reads a digest of every catalog entry the normalised form is
    made from (the provider's ``catalog_digest``); a database whose digest this process has
    already reflected gets that result without the inspector's queries. A fleet migrated by the
    same revisions has a handful of distinct schemas, so after the first of each, verifying a
    target costs one catalog query. That one leaves its transaction open, if the connection is
    not in autocommit (``providers.autocommit``), so that the caller's next catalog question
    (the grant check after an upgrade) shares it; the caller ends it.

    ``shared`` (``get(digest)`` and ``put(digest, text)``, canonical JSON) holds what other
    processes reflected: a worker that starts after another one read a schema takes it from
    there instead of running the inspector's queries itself.
    """
    digest = None
    provider = providers.for_dialect(connection.dialect.name)
    if provider is not None and provider.catalog_digest is not None:
        digest = provider.catalog_digest(connection)
        known = _reflected.get(digest)
        if known is None and shared is not None:
            known = shared.get(digest)
            if known is not None:
                _remember(digest, known)
        if known is not None:
            _reflected.move_to_end(digest)
            return json.loads(known)
        connection.rollback()  # the inspector's queries are planned as usual
    else:
        refresh_default_schema(connection)
    reflected = _reflect(connection)
    if digest is not None:
        text = json.dumps(reflected)
        _remember(digest, text)
        if shared is not None:
            shared.put(digest, text)
    return reflected


def _remember(digest: str, text: str) -> None:
    _reflected[digest] = text
    while len(_reflected) > REFLECTED_KEPT:
        _reflected.popitem(last=False)


def _reflect(connection: Connection) -> dict:
    provider = providers.for_dialect(connection.dialect.name)
    unique_constraints_are_indexes = (
        provider is not None and provider.unique_constraints_are_indexes
    )
    inspector = inspect(connection)
    names = [name for name in sorted(inspector.get_table_names()) if name != VERSION_TABLE]
    if not names:
        return empty()
    found = {
        kind: {table: value for (_, table), value in read(filter_names=names).items()}
        for kind, read in (
            ("columns", inspector.get_multi_columns),
            ("primary_key", inspector.get_multi_pk_constraint),
            ("indexes", inspector.get_multi_indexes),
            ("unique_constraints", inspector.get_multi_unique_constraints),
            ("foreign_keys", inspector.get_multi_foreign_keys),
        )
        # In MySQL a unique constraint is a unique index: it is already in the indexes.
        if not (kind == "unique_constraints" and unique_constraints_are_indexes)
    }
    return {
        "tables": {
            name: _table({kind: values.get(name) or [] for kind, values in found.items()})
            for name in names
        }
    }


# Normalised schemas this process reflected, by catalog digest (canonical JSON; LRU).
_reflected: OrderedDict[str, str] = OrderedDict()
REFLECTED_KEPT = 64
process.register("schema.reflected", reset=_reflected.clear)


def empty() -> dict:
    """The schema of a database no revision was applied to."""
    return {"tables": {}}


def fingerprint(schema: dict) -> str:
    """sha256 (hex) of the canonical JSON of a normalised schema."""
    canonical = json.dumps(schema, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def tables(schema: dict) -> list[str]:
    return sorted(schema.get("tables", {}))


# --- Reflection -----------------------------------------------------------------------------


def _table(reflected: dict) -> dict:
    """One table's normalised form, from what ``get_multi_*`` returned for it."""
    columns = {
        column["name"]: {
            "type": normalise_type(column["type"]),
            "nullable": bool(column["nullable"]),
            "default": normalise_default(column.get("default")),
        }
        for column in reflected["columns"]
    }
    primary_key = list((reflected["primary_key"] or {}).get("constrained_columns") or [])

    indexes = {}
    for index in reflected["indexes"]:
        if index.get("duplicates_constraint"):
            continue  # the index behind a unique constraint: listed as the constraint
        key = index.get("name") or _unnamed("index", index["column_names"])
        indexes[key] = {
            "columns": [str(column) for column in index["column_names"]],
            "unique": bool(index.get("unique")),
        }

    unique_constraints = {}
    for constraint in reflected.get("unique_constraints", []):
        key = constraint.get("name") or _unnamed("unique", constraint["column_names"])
        unique_constraints[key] = {"columns": list(constraint["column_names"])}

    foreign_keys = {}
    for key_ in reflected["foreign_keys"]:
        entry = {
            "columns": list(key_["constrained_columns"]),
            "references": key_["referred_table"],
            "referred_columns": list(key_["referred_columns"]),
        }
        for action in ("ondelete", "onupdate"):
            value = ((key_.get("options") or {}).get(action) or "").upper()
            if value and value not in _DEFAULT_ACTIONS:
                entry[action] = value
        key = key_.get("name") or _unnamed("fk", key_["constrained_columns"])
        foreign_keys[key] = entry

    return {
        "columns": columns,
        "primary_key": primary_key,
        "indexes": indexes,
        "unique_constraints": unique_constraints,
        "foreign_keys": foreign_keys,
    }


def _unnamed(kind: str, columns) -> str:
    # SQLite reports no name for constraints declared without one.
    return f"({kind} on {', '.join(columns)})"


def normalise_type(type_) -> str:
    """A column type as SQL-ish text without what only the server cares about: ``VARCHAR(255)``,
    ``INTEGER`` (MySQL's ``INT(11)`` too), ``TIMESTAMP WITH TIME ZONE``, ``NUMERIC(10,2)``."""
    name = (getattr(type_, "__visit_name__", None) or type(type_).__name__).upper()
    args = []
    length = getattr(type_, "length", None)
    if isinstance(length, int):
        args.append(str(length))
    precision = getattr(type_, "precision", None)
    if isinstance(precision, int):
        args.append(str(precision))
        scale = getattr(type_, "scale", None)
        if isinstance(scale, int):
            args.append(str(scale))
    text = f"{name}({','.join(args)})" if args else name
    enums = getattr(type_, "enums", None)
    if enums:
        text = f"{name}({','.join(repr(value) for value in enums)})"
    if getattr(type_, "unsigned", False):
        text += " UNSIGNED"
    if getattr(type_, "timezone", False):
        text += " WITH TIME ZONE"
    return text


_CURRENT_TIMESTAMP = re.compile(
    r"^(current_timestamp(\(\))?|now\(\)|localtimestamp|transaction_timestamp\(\))$"
)


def normalise_default(default) -> str | None:
    """A server default in one spelling: casts and outer parentheses removed, the current time
    as ``current_timestamp``, PostgreSQL's serial ``nextval(...)`` as ``autoincrement``, a NULL
    default as none."""
    if default is None:
        return None
    text = str(default).strip()
    while text.startswith("(") and text.endswith(")") and _balanced(text[1:-1]):
        text = text[1:-1].strip()
    if text.lower().startswith("nextval("):
        return "autoincrement"
    # PostgreSQL: 'abc'::character varying, 0::integer, ('x'::text)
    text = re.sub(r"::[a-z_ ]+(\[\])?(\(\d+(,\d+)?\))?", "", text, flags=re.IGNORECASE).strip()
    while text.startswith("(") and text.endswith(")") and _balanced(text[1:-1]):
        text = text[1:-1].strip()
    lowered = text.lower()
    if lowered == "null":
        return None
    if _CURRENT_TIMESTAMP.match(lowered):
        return "current_timestamp"
    if lowered in ("true", "false"):
        return lowered
    return text


def _balanced(text: str) -> bool:
    depth = 0
    for char in text:
        depth += {"(": 1, ")": -1}.get(char, 0)
        if depth < 0:
            return False
    return depth == 0


# --- Comparison -----------------------------------------------------------------------------


def compare(reference: dict, actual: dict) -> list[str]:
    """What ``actual`` has that ``reference`` has not, and the reverse, one line each, e.g.
    "missing table invoices", "extra column accounts.nickname (VARCHAR(50), nullable)",
    "missing index projects.ix_projects_account_id (account_id)". Empty when they agree."""
    lines = []
    expected, found = reference.get("tables", {}), actual.get("tables", {})
    for name in sorted(expected.keys() - found.keys()):
        lines.append(f"missing table {name}")
    for name in sorted(found.keys() - expected.keys()):
        lines.append(f"extra table {name}")
    for name in sorted(expected.keys() & found.keys()):
        lines.extend(_compare_table(name, expected[name], found[name]))
    return lines


def _compare_table(table: str, expected: dict, found: dict) -> list[str]:
    lines = []
    want, have = expected["columns"], found["columns"]
    for column in sorted(want.keys() - have.keys()):
        lines.append(f"missing column {table}.{column} ({_describe_column(want[column])})")
    for column in sorted(have.keys() - want.keys()):
        lines.append(f"extra column {table}.{column} ({_describe_column(have[column])})")
    for column in sorted(want.keys() & have.keys()):
        a, b = want[column], have[column]
        where = f"column {table}.{column}"
        if a["type"] != b["type"]:
            lines.append(f"{where}: type {b['type']}, expected {a['type']}")
        if a["nullable"] != b["nullable"]:
            lines.append(
                f"{where}: {_nullability(b['nullable'])}, expected {_nullability(a['nullable'])}"
            )
        if a["default"] != b["default"]:
            lines.append(
                f"{where}: default {b['default'] or 'none'}, expected {a['default'] or 'none'}"
            )
    if expected["primary_key"] != found["primary_key"]:
        lines.append(
            f"primary key of {table}: ({', '.join(found['primary_key']) or 'none'}), "
            f"expected ({', '.join(expected['primary_key']) or 'none'})"
        )
    for kind, noun, describe in (
        ("indexes", "index", _describe_index),
        ("unique_constraints", "unique constraint", _describe_columns),
        ("foreign_keys", "foreign key", _describe_foreign_key),
    ):
        lines.extend(_compare_named(table, noun, expected[kind], found[kind], describe))
    return lines


def _compare_named(table, noun, want: dict, have: dict, describe) -> list[str]:
    lines = []
    for name in sorted(want.keys() - have.keys()):
        lines.append(f"missing {noun} {table}.{name} ({describe(want[name])})")
    for name in sorted(have.keys() - want.keys()):
        lines.append(f"extra {noun} {table}.{name} ({describe(have[name])})")
    for name in sorted(want.keys() & have.keys()):
        if want[name] != have[name]:
            lines.append(
                f"{noun} {table}.{name}: ({describe(have[name])}), "
                f"expected ({describe(want[name])})"
            )
    return lines


def _nullability(nullable: bool) -> str:
    return "nullable" if nullable else "not null"


def _describe_column(column: dict) -> str:
    text = f"{column['type']}, {_nullability(column['nullable'])}"
    if column["default"] is not None:
        text += f", default {column['default']}"
    return text


def _describe_columns(entry: dict) -> str:
    return ", ".join(entry["columns"])


def _describe_index(entry: dict) -> str:
    return _describe_columns(entry) + ("; unique" if entry["unique"] else "")


def _describe_foreign_key(entry: dict) -> str:
    text = (
        f"{', '.join(entry['columns'])} -> {entry['references']}"
        f"({', '.join(entry['referred_columns'])})"
    )
    for action in ("ondelete", "onupdate"):
        if action in entry:
            text += f" on {action[2:]} {entry[action].lower()}"
    return text
