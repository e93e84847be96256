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

    On PostgreSQL one query first reads a digest of every catalog entry the
    normalised form is made from (see ``_PG_CATALOG``); a database whose digest this process has
    already reflected gets that result without the inspector's queries. A fleet migrated by the
    same revisions has a handful of distinct schemas, so after the first of each, verifying a
    target costs one catalog query. That one leaves its transaction open, so that the caller's
    next catalog question (the grant check after an upgrade) shares it; the caller ends it.

    ``shared`` (``get(digest)`` and ``put(digest, text)``, canonical JSON) holds what other
    processes reflected: a worker that starts after another one read a schema takes it from
    there instead of running the inspector's queries itself.
    """
    digest = None
    if connection.dialect.name == "postgresql":
        digest = _catalog_digest(connection)
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
        if not (kind == "unique_constraints" and connection.dialect.name == "mysql")
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

# Every catalog entry PostgreSQL reflection reads for the tables SQLAlchemy lists without a
# schema (visible in the search_path, not pg_catalog, not temporary), one line each, as raw
# catalog values rather than deparsed text (``pg_get_indexdef`` and ``pg_get_constraintdef`` cost
# the server more than the rest of the query): each column with its number, type, not-null,
# default, identity and generation, and for a user-defined type (OIDs from 16384 up) an enum's
# labels or a domain's base type, default and checks, looked up for that column alone (a second
# pass over pg_attribute doubled the query's cost on a new backend); each index (its columns as
# column numbers, unique, primary, operator classes, options, collations, expressions,
# predicate); each constraint (kind, columns, backing index, referenced table and columns,
# actions). Names are in the lines, OIDs only where PostgreSQL fixes them (built-in types,
# operator classes, collations), so databases migrated alike have the same lines, and a digest
# seen before always means the same schema; a database with another history (a dropped column
# shifts the numbers) just gets a full read. A line is a row literal, so a NULL and an empty text
# differ. The server version is a line too: another major version may reflect the same catalog
# otherwise.
_PG_CATALOG = """
WITH tables AS (
    SELECT c.oid, c.relnamespace::pg_catalog.regnamespace::text || '.' || c.relname AS name
    FROM pg_catalog.pg_class c
    WHERE c.relkind IN ('r', 'p') AND c.relpersistence <> 't'
      AND c.relnamespace <> 'pg_catalog'::pg_catalog.regnamespace
      AND pg_catalog.pg_table_is_visible(c.oid)
)
SELECT 'schema ' || coalesce(pg_catalog.current_schema(), '')
UNION ALL
SELECT 'server ' || pg_catalog.current_setting('server_version_num')
UNION ALL
SELECT ROW('column', t.name, a.attnum, a.attname,
    pg_catalog.format_type(a.atttypid, a.atttypmod), a.attnotnull, a.attidentity, a.attgenerated,
    pg_catalog.pg_get_expr(d.adbin, d.adrelid),
    CASE WHEN a.atttypid >= 16384 THEN (
        SELECT ROW(ty.typtype, pg_catalog.format_type(ty.typbasetype, ty.typtypmod), ty.typnotnull,
            ty.typdefault,
            (SELECT string_agg(e.enumlabel, ',' ORDER BY e.enumsortorder)
             FROM pg_catalog.pg_enum e WHERE e.enumtypid = ty.oid),
            (SELECT string_agg(pg_catalog.pg_get_constraintdef(k.oid), ',' ORDER BY k.conname)
             FROM pg_catalog.pg_constraint k WHERE k.contypid = ty.oid))::text
        FROM pg_catalog.pg_type ty WHERE ty.oid = a.atttypid) END)::text
FROM tables t
JOIN pg_catalog.pg_attribute a ON a.attrelid = t.oid AND a.attnum > 0 AND NOT a.attisdropped
LEFT JOIN pg_catalog.pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
UNION ALL
SELECT ROW('index', t.name, i.indexrelid::pg_catalog.regclass::text, i.indisunique,
    i.indisprimary, i.indnkeyatts, i.indkey::text, i.indclass::text, i.indoption::text,
    i.indcollation::text, pg_catalog.pg_get_expr(i.indexprs, i.indrelid),
    pg_catalog.pg_get_expr(i.indpred, i.indrelid))::text
FROM tables t JOIN pg_catalog.pg_index i ON i.indrelid = t.oid
UNION ALL
SELECT ROW('constraint', t.name, k.conname, k.contype, k.conkey::text,
    k.conindid::pg_catalog.regclass::text, k.confrelid::pg_catalog.regclass::text,
    k.confkey::text, k.confupdtype, k.confdeltype, k.confmatchtype, k.condeferrable,
    k.condeferred)::text
FROM tables t JOIN pg_catalog.pg_constraint k ON k.conrelid = t.oid
"""


_PG_NESTED_LOOPS = (
    "SELECT pg_catalog.set_config('enable_hashjoin', 'off', true), "
    "pg_catalog.set_config('enable_mergejoin', 'off', true)"
)


def _catalog_digest(connection: Connection) -> str:
    """sha256 of the catalog lines of ``_PG_CATALOG``; sets the dialect's default schema.
    Leaves the connection in the transaction the query ran in (with nested loops set)."""
    # Nested loops over the catalog indexes: a new backend plans and runs the query in half the
    # time it takes with hash joins, which need statistics read for every catalog it touches.
    connection.exec_driver_sql(_PG_NESTED_LOOPS)
    lines = sorted(connection.exec_driver_sql(_PG_CATALOG).scalars())
    connection.dialect.default_schema_name = next(
        line.removeprefix("schema ") for line in lines if line.startswith("schema ")
    )
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def forget_reflected() -> None:
    """Forget the schemas reflected by this process (tests)."""
    _reflected.clear()


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
