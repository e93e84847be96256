"""API tokens made before they were stored hashed (DRF's authtoken kept them in plain text in
``authtoken_token``) are moved to django-rest-knox as digests, so they keep working, and their
plain text is deleted. Nothing to do on a new control plane."""

from django.conf import settings
from django.db import migrations, transaction


def hash_plain_tokens(apps, schema_editor):
    connection = schema_editor.connection
    if "authtoken_token" not in connection.introspection.table_names():
        return
    from knox.crypto import hash_token
    from knox.settings import CONSTANTS

    AuthToken = apps.get_model("knox", "AuthToken")
    with transaction.atomic(using=connection.alias), connection.cursor() as cursor:
        cursor.execute("SELECT key, user_id FROM authtoken_token")
        for key, user_id in cursor.fetchall():
            # No expiry, as before: retire them in the admin (API tokens) when convenient.
            AuthToken.objects.create(
                digest=hash_token(key),
                token_key=key[: CONSTANTS.TOKEN_KEY_LENGTH],
                user_id=user_id,
                expiry=None,
            )
        if connection.vendor == "sqlite":
            # Overwrite the deleted rows in the file, not only unlink them.
            cursor.execute("PRAGMA secure_delete = ON")
        cursor.execute("DELETE FROM authtoken_token")
    if connection.vendor == "sqlite":
        # And out of the write-ahead log, which still holds the pages as they were.
        with connection.cursor() as cursor:
            cursor.execute("PRAGMA wal_checkpoint(TRUNCATE)")


class Migration(migrations.Migration):
    atomic = False  # the SQLite checkpoint must follow the commit

    dependencies = [
        ("knox", "0009_extend_authtoken_field"),
        migrations.swappable_dependency(settings.AUTH_USER_MODEL),
    ]

    operations = [migrations.RunPython(hash_plain_tokens, migrations.RunPython.noop)]
