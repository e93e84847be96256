"""The one exception tree of the engine.

Transport errors (``requests``, ``hvac``, DBAPI drivers, Alembic) are mapped to these at the
boundary where they happen, so callers catch only ``MigratorError`` and its children. Every message
says which target or which Vault path is concerned and what to do; none ever contains a secret.

``retryable`` tells an operator (and the dispatcher) whether running the same thing again later
can succeed without anybody changing anything.
"""


class MigratorError(Exception):
    """Base of every error the engine raises on purpose."""

    code = "error"
    retryable = False
    # For a failed upgrade or downgrade, the partial ``migrator.runner.RunResult``: what was
    # applied before the failure, where the target stands now, the run's log lines.
    result = None


# --- Vault ----------------------------------------------------------------------------------


class VaultError(MigratorError):
    code = "vault_error"


class VaultUnavailable(VaultError):
    """Vault cannot be reached, timed out, or is sealed."""

    code = "vault_unavailable"
    retryable = True


class VaultAuthError(VaultError):
    """Logging in to Vault failed (bad token, wrong AppRole secret id, rejected JWT)."""

    code = "vault_auth_failed"


class VaultForbidden(VaultError):
    """The Vault token may not read the path."""

    code = "vault_forbidden"


class SecretNotFound(VaultError):
    """No secret exists at the path."""

    code = "secret_not_found"


class MountNotKV2(VaultError):
    """VAULT_MOUNT_POINT is a KV version 1 mount; the control plane reads KV version 2."""

    code = "vault_mount_not_kv2"


class DatabaseRoleNotFound(VaultError):
    """The secret names a role (``admin_role``) the database secrets engine does not have."""

    code = "vault_role_not_found"


class SecretIncomplete(VaultError):
    """The secret exists but lacks keys, or a key has a value of the wrong form."""

    code = "secret_incomplete"


# --- Targets and their databases ----------------------------------------------------------------


class TargetError(MigratorError):
    code = "target_error"


class UnknownProvider(TargetError):
    code = "unknown_provider"


class DatabaseUnreachable(TargetError):
    """The database host did not answer (DNS, refused, connect timeout)."""

    code = "database_unreachable"
    retryable = True


class DatabaseNotFound(TargetError):
    """The server answered, but the database the secret names does not exist on it."""

    code = "database_not_found"


class DatabaseAuthFailed(TargetError):
    """The database rejected the admin credentials."""

    code = "database_auth_failed"


class OwnerRoleFailed(TargetError):
    """The migration session could not switch to the secret's ``owner_role`` (SET ROLE); no DDL
    ran."""

    code = "owner_role_failed"


class TargetLocked(TargetError):
    """Another run (another control plane, an author's ``alembic`` CLI) holds the target's lock."""

    code = "locked"
    retryable = True


# --- Alembic --------------------------------------------------------------------------------


class MigrationError(MigratorError):
    code = "migration_error"


class RevisionNotFound(MigrationError):
    """The requested revision, or the one recorded in the target, is not in the script directory."""

    code = "revision_not_found"


class MultipleHeads(MigrationError):
    """The script directory has more than one head and no single target was named."""

    code = "multiple_heads"


class EnvPyContract(MigrationError):
    """The script directory's env.py does not meet what the control plane needs of it (README:
    "Bringing your own Alembic project"); nothing ran."""

    code = "env_py_contract"


class ScriptDirectoryUnreadable(MigrationError):
    """A file of the script directory cannot be loaded (a revision importing a module the
    control plane's processes cannot import, a syntax error); nothing ran."""

    code = "script_directory_unreadable"


class MigrationFailed(MigrationError):
    """A revision raised while it was applied; the target stands at ``current_revision``."""

    code = "migration_failed"

    def __init__(self, message, *, failed_revision=None, current_revision=None):
        super().__init__(message)
        self.failed_revision = failed_revision
        self.current_revision = current_revision


class LockTimeout(MigrationFailed):
    """A revision's statement waited for a lock another session held (an open application
    transaction that read the table) longer than the migration session allows, and gave up so
    that the application's queries on that table were not queued behind it. The revision is not
    at fault: running it again later can succeed."""

    code = "lock_timeout"
    retryable = True


# --- Schema verification ----------------------------------------------------------------------


class VerificationError(MigratorError):
    """The schema of a target could not be verified (it is not known to be wrong)."""

    code = "verification_error"


class NoScratchDatabase(VerificationError):
    """No scratch server is configured to build the reference schema of a provider."""

    code = "no_scratch_database"


# --- Backups and restores ---------------------------------------------------------------------


class BackupFailed(MigratorError):
    """The backup taken before a run could not be made; the run stopped before any DDL."""

    code = "backup_failed"


class RestoreFailed(MigratorError):
    """A backup could not be restored (missing or altered file, the restore tool failed)."""

    code = "restore_failed"
