"""Blue/green schema changes across the fleet: the expand/contract pattern on Alembic branches.

As in OpenStack Neutron, revisions live on two labelled branches: ``expand`` (additive changes
the old application tolerates: new tables, nullable columns, backfills, triggers that keep old
and new columns in step) and ``contract`` (removals only the new application tolerates). A
fleet rollout runs every target's expand phase, deploys the new application, then runs the
contract phase, which is refused while any target in scope has not finished expand (the gate).
"""

import weakref
from dataclasses import dataclass

from migrator import process, runner

EXPAND = "expand"
CONTRACT = "contract"
PHASES = (EXPAND, CONTRACT)


@dataclass(frozen=True)
class PhaseState:
    """Where one revision string stands on each phase branch."""

    expand: bool
    contract: bool

    @property
    def label(self):
        if self.contract:
            return "contracted"
        if self.expand:
            return "expanded"
        return "before expand"


def has_phases(*, script_location=None):
    """Whether the script directory has both phase branches."""
    return set(PHASES) <= set(branch_heads(script_location=script_location))


def branch_heads(*, script_location=None):
    """{label: head revision} for the ``expand`` and ``contract`` branches that exist."""
    script = runner.script_directory(script_location)
    found = {}
    for head in script.get_heads():
        for label in script.get_revision(head).branch_labels:
            if label in PHASES:
                found[label] = head
    return found


def destination(phase):
    """The Alembic destination of a phase run: the head of that branch."""
    if phase not in PHASES:
        raise ValueError(f"Unknown phase {phase!r}: use {' or '.join(PHASES)}.")
    return f"{phase}@head"


def state(revision, *, script_location=None):
    """The ``PhaseState`` of a target recorded at ``revision`` ("a,b" for several heads)."""
    heads = branch_heads(script_location=script_location)
    done = applied(revision, script_location)
    return PhaseState(
        expand=heads.get(EXPAND) in done if EXPAND in heads else True,
        contract=heads.get(CONTRACT) in done if CONTRACT in heads else True,
    )


def lagging_on_expand(targets, *, script_location=None):
    """The targets (objects with ``name`` and ``revision``) that have not finished expand."""
    cache = {}
    lagging = []
    for target in targets:
        if target.revision not in cache:
            cache[target.revision] = state(target.revision, script_location=script_location)
        if not cache[target.revision].expand:
            lagging.append(target)
    return lagging


# By script directory as read (a new read after a deploy starts afresh), then by revision.
_applied_cache: "weakref.WeakKeyDictionary[object, dict]" = weakref.WeakKeyDictionary()
process.register("phases.applied", reset=_applied_cache.clear)


def applied(revision, script_location=None):
    """Every revision at or below ``revision``: what a target recorded there has applied."""
    revisions = tuple(r for r in (revision or "").split(",") if r)
    if not revisions:
        return set()
    script = runner.script_directory(script_location)
    cache = _applied_cache.setdefault(script, {})
    if revisions not in cache:
        try:
            found = {rev.revision for rev in script.iterate_revisions(revisions, "base")}
        except Exception:  # noqa: BLE001 - a revision this code does not know: nothing known done
            found = set()
        cache[revisions] = frozenset(found)
    return cache[revisions]
