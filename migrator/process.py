"""What this process keeps in memory between runs, and what a forked child must not keep.

Every cache, pool, thread or lock that lives as long as the process registers here, once, when
its module is imported:

- ``reset`` forgets what it holds; ``process.reset()`` calls every one of them (tests between
  cases, a process that must read everything afresh). Nothing is reset per run: a registration
  costs nothing after import.
- ``after_fork``, when given, runs in a child right after ``os.fork()`` (``os.register_at_fork``),
  for what must not cross a fork: threads (the child inherits their objects, not the threads),
  locks (one may have been held by a thread of the parent, and nothing in the child would ever
  release it), connections and engines (a socket shared by two processes interleaves their
  traffic), the Vault client and its token renewal.

What the ``qcluster`` parent loads before forking its workers is kept on purpose: the script
directory with its revisions and the compiled env.py (``migrator.runner.preload``, then
``gc.freeze()`` in ``controlplane.apps``), which the workers share instead of each reading it.
Those caches register a ``reset`` and no ``after_fork``; a worker still checks the script
directory against the disk before each run.
"""

import os
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class _State:
    name: str
    reset: Callable[[], None] | None
    after_fork: Callable[[], None] | None


_states: dict[str, _State] = {}


def register(
    name: str,
    *,
    reset: Callable[[], None] | None = None,
    after_fork: Callable[[], None] | None = None,
) -> None:
    """Make ``reset`` part of ``process.reset()`` and ``after_fork`` (if any) part of what a
    forked child runs first. ``name`` (the owning module and its cache, e.g. "runner.scripts")
    identifies the entry: registering a name again replaces it (a module imported twice)."""
    _states[name] = _State(name, reset, after_fork)


def reset() -> None:
    """Forget everything this process keeps between runs (every registered ``reset``): the next
    use reads the script directory, logs in to Vault and builds its engines again."""
    for state in list(_states.values()):
        if state.reset is not None:
            state.reset()


def registered() -> tuple[str, ...]:
    """The names of the registered process state, in registration order."""
    return tuple(_states)


def _after_fork_in_child() -> None:
    for state in list(_states.values()):
        if state.after_fork is not None:
            state.after_fork()


os.register_at_fork(after_in_child=_after_fork_in_child)
