"""Saving a few fields of a run or a target as ``save(update_fields=...)`` does, without
Django building and compiling the same UPDATE again on every call.

A worker saves its run and its target once per run (the outcome), and Django spent most of that
CPU on the query (``UpdateQuery``, its compiler), not on the database. The statement for a
given model and set of fields is always the same; only the values change.
"""

import functools

from django.db import DatabaseError, connection, transaction

from tenants.models import TargetStatus


def save_fields(instance, fields, *, unless_held=False):
    """Write ``fields`` of ``instance`` (a saved model instance) as
    ``instance.save(update_fields=fields)`` writes them: each value as ``save`` converts it
    (``auto_now`` fields take the time now), in one UPDATE by primary key, or ``DatabaseError``
    when the row is gone. With ``unless_held``, a target's ``status`` is written ``held`` when
    the target is held by then. No ``pre_save``/``post_save`` signal is sent: nothing listens
    to runs or targets."""
    if not fields:
        return
    sql, columns = _update(type(instance), frozenset(fields), unless_held, connection.vendor)
    params = []
    for field in columns:
        value = field.get_db_prep_save(field.pre_save(instance, False), connection)
        if unless_held and field.attname == "status":
            params += [TargetStatus.HELD, value]
        else:
            params.append(value)
    params.append(instance.pk)
    with transaction.mark_for_rollback_on_error(), connection.cursor() as cursor:
        cursor.execute(sql, params)
        if not cursor.rowcount:
            raise DatabaseError("Save with update_fields did not affect any rows.")


def unless_held_sql():
    """``statuses.unless_held`` as SQL for a target's row: its two parameters are ``held`` and
    the status to write when the target is not held."""
    return f"CASE WHEN {connection.ops.quote_name('held')} THEN %s ELSE %s END"


@functools.cache
def _update(model, names, unless_held, vendor):
    """The UPDATE of ``names`` of ``model`` (quoted for ``vendor``), and its fields in the
    order of their placeholders. Built once per process: it depends on nothing but the model's
    definition."""
    quote = connection.ops.quote_name
    meta = model._meta
    columns = [field for field in meta.local_concrete_fields if field.name in names]
    if {field.name for field in columns} != names or any(field.primary_key for field in columns):
        raise ValueError(f"Cannot save {sorted(names)} of {meta.label} this way")
    # A target's status, unless it is held by the time of the write: the record of a run that
    # ends after its target was held says so.
    held = unless_held_sql()
    assignments = ", ".join(
        f"{quote(field.column)} = " + (held if unless_held and field.attname == "status" else "%s")
        for field in columns
    )
    table = quote(meta.db_table)
    sql = f"UPDATE {table} SET {assignments} WHERE {quote(meta.pk.column)} = %s"  # noqa: S608
    return sql, columns
