"""What a verification found: ``Verification`` (the schema against its reference, with the
differences) and ``GrantCheck`` (the app user's privileges), with the report shown on the run and
the target and the lines for the run's log."""

from __future__ import annotations

from dataclasses import dataclass, field

from migrator.redaction import redact

FINGERPRINT_SHOWN = 12


# --- What a verification found ----------------------------------------------------------------


@dataclass
class GrantCheck:
    """The app user's privileges on the tables of one database, as the server reports them.

    ``missing`` maps an object ("projects", "sequence accounts_id_seq", "schema public") to
    the privileges the app user lacks on it; ``excess`` lists DDL rights it should not have
    ("CREATE on schema public"). ``not_checked`` says why nothing was checked, when so.
    """

    username: str
    missing: dict[str, list[str]] = field(default_factory=dict)
    excess: list[str] = field(default_factory=list)
    not_checked: str = ""

    @property
    def problems(self) -> list[str]:
        lines = [
            f"app user {self.username} lacks {', '.join(privileges)} on {name}"
            for name, privileges in self.missing.items()
        ]
        if self.excess:
            lines.append(f"app user {self.username} may run DDL: {'; '.join(self.excess)}")
        return lines

    @property
    def ok(self) -> bool:
        return not self.not_checked and not self.problems


@dataclass
class Verification:
    """What verifying one target found. ``not_verified`` says why the schema was not compared
    (then ``drifted`` is False: unknown is not wrong)."""

    target: str
    provider: str
    revision: str | None
    fingerprint: str = ""
    reference_fingerprint: str = ""
    differences: list[str] = field(default_factory=list)
    not_verified: str = ""
    grants: GrantCheck | None = None
    duration_ms: int = 0

    @property
    def verified(self) -> bool:
        return not self.not_verified

    @property
    def drifted(self) -> bool:
        return self.verified and bool(self.differences)

    @property
    def grant_problems(self) -> list[str]:
        return self.grants.problems if self.grants is not None else []

    @property
    def outcome(self) -> str:
        """One word for tables and metrics: matches, drifted or not-verified."""
        if not self.verified:
            return "not-verified"
        return "drifted" if self.drifted else "matches"

    def report(self) -> str:
        """The drift report shown on the run and on the target: the schema, then the app user."""
        at = f"{self.revision or 'base'} ({self.provider})"
        if not self.verified:
            lines = [f"Schema at {at}: not verified: {self.not_verified}"]
        elif self.drifted:
            count = len(self.differences)
            lines = [
                f"Schema at {at}: DRIFTED from the reference, {count} "
                f"difference{'s' if count != 1 else ''}:"
            ]
            lines += [f"  - {line}" for line in self.differences]
            lines.append(
                f"  fingerprint {self.fingerprint[:FINGERPRINT_SHOWN]}, reference "
                f"{self.reference_fingerprint[:FINGERPRINT_SHOWN]}"
            )
        else:
            lines = [
                f"Schema at {at}: matches the reference "
                f"(fingerprint {self.fingerprint[:FINGERPRINT_SHOWN]})."
            ]
        if self.grants is not None:
            lines.append("")
            lines.append(self._grant_section())
        return redact("\n".join(lines))

    def _grant_section(self) -> str:
        grants = self.grants
        if grants.not_checked:
            return f"App user: not checked: {grants.not_checked}"
        if not grants.problems:
            return (
                f"App user {grants.username}: may SELECT, INSERT, UPDATE and DELETE on every "
                "table, and may not run DDL."
            )
        return "\n".join(
            [f"App user {grants.username}: {len(grants.problems)} problem(s):"]
            + [f"  - {line}" for line in grants.problems]
        )

    def log_lines(self) -> list[str]:
        """Lines for the run's log."""
        if not self.verified:
            lines = [f"Schema of {self.target} not verified: {self.not_verified}"]
        elif self.drifted:
            lines = [
                f"Schema of {self.target} DRIFTED from the reference for "
                f"{self.revision or 'base'} ({self.provider}): " + "; ".join(self.differences)
            ]
        else:
            lines = [
                f"Schema of {self.target} matches the reference for {self.revision or 'base'} "
                f"({self.provider}), fingerprint {self.fingerprint[:FINGERPRINT_SHOWN]}"
            ]
        if self.grants is not None:
            if self.grants.not_checked:
                lines.append(f"App user grants not checked: {self.grants.not_checked}")
            elif self.grants.problems:
                lines += [f"Grants: {line}" for line in self.grants.problems]
            else:
                lines.append(f"Grants of app user {self.grants.username}: as expected")
        return [redact(line) for line in lines]
