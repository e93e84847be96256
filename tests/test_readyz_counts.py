"""/readyz?format=json counts the fleet by status as it is now: its first answer after a revision
is deployed already counts the targets at the old head as behind (it counted them up to date,
then reconciled: right only from the second request on)."""

import pytest
from django.urls import reverse

from tests.test_deploy import LINEAR_HEAD, script_copy, write_revision  # noqa: F401 - fixture


@pytest.mark.django_db(transaction=True)  # /readyz runs its checks on threads of their own
def test_the_first_readyz_after_a_deploy_counts_them_behind(client, script_copy, target_factory):  # noqa: F811
    for _ in range(3):
        target_factory(revision=LINEAR_HEAD, status="up_to_date")
    counts = client.get(reverse("readyz") + "?format=json").json()["targets"]
    assert (counts["up_to_date"], counts["behind"]) == (3, 0)

    write_revision(script_copy / "versions", "0005_deploy_notes", LINEAR_HEAD, "deploy_notes")

    counts = client.get(reverse("readyz") + "?format=json").json()["targets"]
    assert (counts["up_to_date"], counts["behind"]) == (0, 3)
