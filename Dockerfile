# One image for every Rekku process (the README's architecture): `docker compose` runs it as the ingress, each
# worker pool, beat and Flower, choosing the part with the `rekku` sub-command:
#   docker run --rm rekku-on-celery worker --pool io
#
# Two stages: the compiler and headers mysqlclient needs stay in `build`; the runtime stage gets
# the finished virtualenv plus the shared libraries it links to, Chromium and chromedriver.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ----------------------------------------------------------------------------- build
FROM ${PYTHON_IMAGE} AS build

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

# default-libmysqlclient-dev + pkg-config + build-essential: what mysqlclient (extra `mariadb`) compiles against.
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        build-essential \
        default-libmysqlclient-dev \
        pkg-config \
 && rm -rf /var/lib/apt/lists/*

RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src

# Dependencies first, read from pyproject.toml, so a code change does not reinstall them.
COPY pyproject.toml ./
RUN python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
extras = ('mariadb', 'selenium', 'reddit', 'signing'); \
print('\n'.join(p['dependencies'] + [d for e in extras for d in p['optional-dependencies'][e]]))" \
        > /tmp/requirements.txt \
 && pip install --upgrade pip \
 && pip install -r /tmp/requirements.txt

# The project itself (a regular, non-editable install: rekku, and workers/ and plugins/ as rekku_workers and
# rekku_plugins, with their migrations; setup.py says why).
COPY README.md setup.py ./
COPY rekku ./rekku
COPY plugins ./plugins
COPY workers ./workers
RUN pip install ".[mariadb,selenium,reddit]"

# ----------------------------------------------------------------------------- runtime
FROM ${PYTHON_IMAGE} AS runtime

# libmariadb3: the client library mysqlclient links to (the runtime half of default-libmysqlclient-dev).
# chromium + chromium-driver: the selenium pool's local browser (/usr/bin/chromium, /usr/bin/chromedriver);
# fonts-liberation so pages render text; tzdata for zoneinfo (TZ).
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        chromium \
        chromium-driver \
        fonts-liberation \
        libmariadb3 \
        tzdata \
 && rm -rf /var/lib/apt/lists/*

# A fixed non-root uid/gid (chown 10001 a bind-mounted directory); bash as its shell for the terminal pool.
RUN groupadd --system --gid 10001 rekku \
 && useradd --system --uid 10001 --gid rekku --home-dir /data --no-create-home --shell /bin/bash rekku \
 && mkdir -p /data /artifacts \
 && chown rekku:rekku /data /artifacts

COPY --from=build /opt/venv /opt/venv

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    REKKU_HOME=/data \
    REKKU_ARTIFACT_DIR=/artifacts

# Fail the build, not the first deployment, when a compiled extra or the browser is missing.
RUN python -c "import MySQLdb, selenium, praw, rekku.cli, rekku.pools" \
 && rekku --help > /dev/null \
 && test -x /usr/bin/chromium \
 && chromedriver --version

USER rekku
WORKDIR /data
# REKKU_HOME: generated credentials, beat's schedule, per-process state. Artifacts: files actions produce.
VOLUME ["/data", "/artifacts"]
EXPOSE 8000 5555

ENTRYPOINT ["rekku"]
CMD ["--help"]
