"""django-q2's task messages, written and handed to its broker many at a time.

``django_q.tasks.async_task`` signs one message and pushes it with one broker call: for a fleet
of 10,000 runs that was 10,000 INSERTs into ``OrmQ`` (each its own commit on the ORM broker) or
10,000 RPUSHes. Here the messages are built exactly as ``async_task`` (django-q2 1.11) builds
them, signed with its own ``SignedPackage``, so a worker takes them unchanged, and pushed with
one call per queue: one RPUSH for Redis, one batched INSERT into ``OrmQ`` in one transaction for
the ORM broker. Any other broker class gets one ``enqueue`` per message, as before.
"""

import logging

from django.db import connections, transaction
from django.utils import timezone

logger = logging.getLogger("tenants.broker")


def message(func, *args, task_id, name, cluster, started=None):
    """The signed message ``async_task(func, *args, task_name=name, cluster=cluster)`` would
    push, with ``task_id`` as its id: the same keys, the same Q_CLUSTER overrides (cached,
    ack_failures), the same ``pre_enqueue`` signal, the same signature (Q_CLUSTER's name salts
    it, SECRET_KEY signs it). Q_CLUSTER's ``sync`` (``async_task`` then runs the task in the
    caller) is not set by this project and not honoured here."""
    from django_q.conf import Conf
    from django_q.signals import pre_enqueue
    from django_q.signing import SignedPackage

    task = {"id": task_id, "name": name, "func": func, "args": args, "cluster": cluster}
    if Conf.CACHED:
        task["cached"] = Conf.CACHED
    if Conf.ACK_FAILURES:
        task["ack_failure"] = Conf.ACK_FAILURES
    task["kwargs"] = {}
    task["started"] = started or timezone.now()
    pre_enqueue.send(sender="django_q", task=task)
    return SignedPackage.dumps(task)


def push(broker, messages):
    """Hand ``messages`` (signed, from ``message``) to ``broker`` (``django_q.brokers.get_broker``)
    all at once, or raise: Redis gets one RPUSH onto the cluster's list, the ORM broker one
    batched INSERT into ``django_q_ormq`` in one transaction (the rows ``ORM.enqueue`` writes,
    each column converted once); nothing is half pushed. Another broker class gets one
    ``enqueue`` call per message."""
    from django_q.brokers.orm import ORM
    from django_q.brokers.redis_broker import Redis
    from django_q.conf import Conf
    from django_q.models import OrmQ

    if not messages:
        return
    if isinstance(broker, Redis):
        broker.connection.rpush(broker.list_key, *messages)
    elif isinstance(broker, ORM):
        broker.get_connection()  # as ORM.enqueue: drops a stale connection first
        database = connections[Conf.ORM]
        meta, quote = OrmQ._meta, database.ops.quote_name
        key, payload, lock = (meta.get_field(name) for name in ("key", "payload", "lock"))
        queue = key.get_db_prep_save(broker.list_key or Conf.CLUSTER_NAME, database)
        now = lock.get_db_prep_save(timezone.now(), database)
        columns = ", ".join(quote(field.column) for field in (key, payload, lock))
        insert = f"INSERT INTO {quote(meta.db_table)} ({columns}) VALUES (%s, %s, %s)"  # noqa: S608
        with transaction.atomic(using=Conf.ORM), database.cursor() as cursor:
            cursor.executemany(insert, [(queue, signed, now) for signed in messages])
    else:
        for signed in messages:
            broker.enqueue(signed)
    logger.info("Pushed %s task(s) to queue %s", len(messages), broker.list_key)
