"""A deadline for a whole HTTP request, not for each read of it.

``requests`` (and so hvac) applies its ``timeout`` to the connect and to each read from the
socket: a server that sends its answer a byte at a time, each within the timeout, holds the
caller for as long as it likes. Vault behind a sick proxy or load balancer did that to runs for
minutes. Here a session's connections report to one watchdog thread per process; a request
made inside ``within(seconds)`` whose time is up has its socket shut down, so the read in
progress ends at once, and ``Deadline.expired`` tells the caller why.

Usage::

    session = requests.Session()
    deadlines.enforce_on(session)
    with deadlines.within(10) as deadline:
        try:
            session.get(url, timeout=10)
        except requests.RequestException:
            if deadline.expired: ...  # the whole request took longer than 10 s

No thread is started per request (the watchdog is started once per process, again after a
fork: ``migrator.process``); a request costs a lock and a notify.
"""

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import requests
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

from migrator import process


class Deadline:
    """The time by which the requests made inside one ``within`` block must be done."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.at = time.monotonic() + seconds
        self.expired = False
        self.connections: list[HTTPConnection] = []


class _Watchdog:
    """The deadlines in force in this process, and the thread that enforces them."""

    def __init__(self):
        self._changed = threading.Condition()
        self._deadlines: set[Deadline] = set()
        self._local = threading.local()
        self._thread = None

    @contextmanager
    def within(self, seconds: float) -> Iterator[Deadline]:
        deadline = Deadline(seconds)
        outer = getattr(self._local, "deadline", None)
        self._local.deadline = deadline
        with self._changed:
            self._deadlines.add(deadline)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="deadlines", daemon=True)
                self._thread.start()
            self._changed.notify()
        try:
            yield deadline
        finally:
            self._local.deadline = outer
            with self._changed:
                self._deadlines.discard(deadline)

    def after_fork(self) -> None:
        """In a forked child: the object came along, the thread did not, and the condition's
        lock may have been held by one of the parent's threads; the parent's deadlines and
        connections are the parent's."""
        self._changed = threading.Condition()
        self._deadlines = set()
        self._local = threading.local()
        self._thread = None

    def watch(self, connection: HTTPConnection) -> None:
        """Put ``connection`` under the deadline of the block this thread is in, if any."""
        deadline = getattr(self._local, "deadline", None)
        if deadline is not None:
            with self._changed:
                deadline.connections.append(connection)

    def _run(self):
        while True:
            with self._changed:
                now = time.monotonic()
                due = [d for d in self._deadlines if d.at <= now]
                if not due:
                    soonest = min((d.at for d in self._deadlines), default=None)
                    self._changed.wait(None if soonest is None else soonest - now)
                    continue
                for deadline in due:
                    self._deadlines.discard(deadline)
                    deadline.expired = True
                connections = [c for d in due for c in d.connections]
            for connection in connections:
                _shut(connection)


def _shut(connection: HTTPConnection) -> None:
    # shutdown(), not close(): the thread blocked in recv() gets end-of-file at once, and the
    # connection pool then drops the connection as it does any connection the server closed.
    sock = getattr(connection, "sock", None)
    if sock is not None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


_watchdog = _Watchdog()
process.register("deadlines.watchdog", after_fork=_watchdog.after_fork)
within = _watchdog.within


class _WatchedHTTPConnection(HTTPConnection):
    def request(self, *args, **kwargs):
        _watchdog.watch(self)
        return super().request(*args, **kwargs)


class _WatchedHTTPSConnection(HTTPSConnection):
    def request(self, *args, **kwargs):
        _watchdog.watch(self)
        return super().request(*args, **kwargs)


class _WatchedHTTPConnectionPool(HTTPConnectionPool):
    ConnectionCls = _WatchedHTTPConnection


class _WatchedHTTPSConnectionPool(HTTPSConnectionPool):
    ConnectionCls = _WatchedHTTPSConnection


_WATCHED_POOLS = {"http": _WatchedHTTPConnectionPool, "https": _WatchedHTTPSConnectionPool}


class _WatchedAdapter(HTTPAdapter):
    """requests' own adapter, whose connections (direct or through a proxy) are watched."""

    def init_poolmanager(self, *args, **kwargs):
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = _WATCHED_POOLS

    def proxy_manager_for(self, proxy, **proxy_kwargs):
        manager = super().proxy_manager_for(proxy, **proxy_kwargs)
        if not proxy.lower().startswith("socks"):  # SOCKS proxies bring pools of their own
            manager.pool_classes_by_scheme = _WATCHED_POOLS
        return manager


def enforce_on(session: requests.Session) -> requests.Session:
    """Make ``session``'s HTTP and HTTPS requests honour ``within`` deadlines; returns it."""
    session.mount("http://", _WatchedAdapter())
    session.mount("https://", _WatchedAdapter())
    return session
