"""Which django-q2 cluster runs a region's migrations.

Each region has its own named cluster (``qcluster`` started with ``Q_CLUSTER_NAME`` set to the
region's cluster), on hosts next to that region's databases; ``REGION_CLUSTERS`` maps regions to
cluster names (``eu=controlplane-eu,us=controlplane-us``). Tasks are routed with django-q2's
``cluster`` argument, so only that cluster's workers take them. With ``REGION_CLUSTERS`` empty
every region goes to the one default cluster.
"""

from django.conf import settings


def cluster_for(region):
    """The cluster name for ``region``, or None for the default cluster."""
    if not settings.REGION_CLUSTERS:
        return None
    return settings.REGION_CLUSTERS.get(region)


def unrouted_reason(region):
    """Why a run for ``region`` cannot be queued, or "" when it can.

    A region with no cluster would wait in a queue no worker reads: it is refused and reported
    instead.
    """
    if settings.REGION_CLUSTERS and region not in settings.REGION_CLUSTERS:
        known = ", ".join(f"{r}={c}" for r, c in sorted(settings.REGION_CLUSTERS.items()))
        return (
            f"no worker cluster serves region {region!r} (REGION_CLUSTERS has {known}): add "
            f"'{region}=<cluster name>' to REGION_CLUSTERS and start `manage.py qcluster` with "
            "Q_CLUSTER_NAME set to it"
        )
    return ""


def current_cluster():
    """The name of the django-q2 cluster this process belongs to (recorded on runs)."""
    from django_q.conf import Conf

    return Conf.CLUSTER_NAME or ""
