"""What a downgrade would do, checked before it runs.

A downgrade runs each revision's ``downgrade()`` in reverse order. A revision whose
``downgrade()`` is empty would move ``alembic_version`` back while leaving its schema in place;
one that raises would fail half-way through the fleet. Both are reported before anything runs.
"""

import ast
import inspect
import textwrap
from dataclasses import dataclass

from migrator import runner
from migrator.exceptions import MigrationError


@dataclass(frozen=True)
class Irreversible:
    revision: str
    reason: str

    def __str__(self):
        return f"{self.revision}: {self.reason}"


def downgrade_steps(current, destination, *, script_location=None):
    """The revisions a downgrade from ``current`` (a revision string, "" or None for base) to
    ``destination`` would revert, newest first."""
    revisions = tuple(r for r in (current or "").split(",") if r)
    return runner.planned(runner.DOWNGRADE, revisions, destination, script_location=script_location)


def is_downgrade(current, destination, *, script_location=None):
    """Whether going from ``current`` to ``destination`` moves backwards in the history."""
    if destination in ("base",) or destination.startswith("-"):
        return bool(current)
    if destination in ("head", "heads") or destination.startswith("+") or "@" in destination:
        return False
    script = runner.script_directory(script_location)
    revisions = tuple(r for r in (current or "").split(",") if r)
    if not revisions or destination in revisions:
        return False
    try:
        below = {rev.revision for rev in script.iterate_revisions(revisions, "base")}
    except Exception:  # noqa: BLE001 - an unknown current revision: let the runner say so
        return False
    return destination in below


def irreversible(current, destination, *, script_location=None):
    """The revisions between ``current`` and ``destination`` whose ``downgrade()`` is empty or
    raises, newest first. Raises ``MigrationError`` for an impossible destination."""
    script = runner.script_directory(script_location)
    found = []
    for revision in downgrade_steps(current, destination, script_location=script_location):
        reason = _downgrade_problem(script.get_revision(revision).module)
        if reason:
            found.append(Irreversible(revision, reason))
    return found


def check_reversible(current, destination, *, target_name, script_location=None):
    """Raise ``MigrationError`` naming every revision that cannot be reverted."""
    problems = irreversible(current, destination, script_location=script_location)
    if problems:
        raise MigrationError(
            f"Cannot downgrade {target_name} to {destination}: "
            + "; ".join(str(p) for p in problems)
            + ". Nothing was run. Write a real downgrade() for these revisions, or restore a "
            "backup instead."
        )


def _downgrade_problem(module):
    function = getattr(module, "downgrade", None)
    if function is None:
        return "it has no downgrade()"
    meaningful = _statements(function)
    if meaningful is None:
        return ""
    if not meaningful:
        # A revision that changes nothing either way (what `alembic merge heads` writes, or
        # an empty placeholder) has nothing to revert.
        if _statements(getattr(module, "upgrade", None)) == []:
            return ""
        return "its downgrade() is empty"
    if any(isinstance(node, ast.Raise) for node in meaningful):
        return "its downgrade() raises"
    return ""


def _statements(function):
    """The statements of ``function`` other than its docstring and ``pass``; None when its
    source cannot be read."""
    if function is None:
        return None
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(function)))
    except (OSError, TypeError, SyntaxError):
        return None
    body = tree.body[0].body
    return [
        node
        for node in body
        if not isinstance(node, ast.Pass)
        and not (isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant))
    ]
