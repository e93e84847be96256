"""Values that cross the boundary between the record (``tenants``) and the engine."""

from dataclasses import dataclass, field

from migrator.secrets import ConnectionInfo


@dataclass(frozen=True)
class Target:
    """One database to migrate: a name for logs and errors, and how to reach it as admin."""

    name: str
    connection: ConnectionInfo = field(repr=False)

    @property
    def provider(self) -> str:
        return self.connection.provider
