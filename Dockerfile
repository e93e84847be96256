# The control plane's image: the web process and the django-q2 workers run from it
# (see compose.yaml). Build: docker build -t tenant-migrations .
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    DATA_DIR=/app/var \
    # tdsodbc registers the FreeTDS ODBC driver; Microsoft's driver is not in Debian.
    MSSQL_ODBC_DRIVER=FreeTDS

# unixODBC and FreeTDS for pyodbc (SQL Server targets). Everything else comes as wheels.
RUN apt-get update \
    && apt-get install -y --no-install-recommends unixodbc tdsodbc \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app

# Dependencies first, in their own layer: a code change does not reinstall them. The empty
# package directories let pip build the project; the project itself runs from /app.
COPY pyproject.toml README.md ./
RUN mkdir -p controlplane tenants migrator tenant_migrations \
    && pip install '.[server]' \
    && pip uninstall -y tenant-migrations-control-plane \
    && rm -rf build *.egg-info

COPY . .
# The admin's static files, served by WhiteNoise from the image.
RUN DEBUG=true STATIC_ROOT=/app/static python manage.py collectstatic --noinput -v0

# An unprivileged user; DATA_DIR (SQLite files, demo databases) is a volume it owns.
RUN useradd --create-home --uid 10001 controlplane \
    && mkdir -p /app/var \
    && chown -R controlplane /app/var \
    && chmod 700 /app/var
USER controlplane
VOLUME ["/app/var"]

EXPOSE 8000
# The web process; compose.yaml runs the workers from the same image with `manage.py qcluster`.
CMD ["sh", "-c", "python manage.py migrate --noinput && python manage.py startup_migrations && exec gunicorn controlplane.wsgi --bind 0.0.0.0:8000 --workers 2 --access-logfile -"]
