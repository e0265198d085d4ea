# syntax=docker/dockerfile:1
# walcar: the sidecar, the injector webhook and the drain, one image (used by helm/walcar).
#   docker build -t ghcr.io/walcar/walcar:$(python -c 'import sidecar; print(sidecar.__version__)') .
# (the version is sidecar/__init__.py's; the Helm chart's appVersion must match it)
ARG PYTHON_VERSION=3.11

# Build stage: a virtualenv holding only the package and its dependencies. A compiler is here in
# case a dependency has no wheel for the platform (then cassandra-driver compiles its Cython
# extensions from source); it stays behind.
FROM python:${PYTHON_VERSION}-slim AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential \
    && rm -rf /var/lib/apt/lists/*
RUN python -m venv /opt/walcar
WORKDIR /src
COPY pyproject.toml README.md ./
COPY sidecar ./sidecar
# The nkeys extra (NATS creds files) and the kafka extra (confluent-kafka, a wheel with librdkafka inside).
# cassandra-driver's compiled extensions (row parsing, murmur3 tokens) carry the CQL and Cassandra-target
# paths: the build fails rather than silently ship the driver's pure-Python fallback.
RUN /opt/walcar/bin/pip install '.[nkeys,kafka]' \
    && /opt/walcar/bin/walcar --help > /dev/null \
    && /opt/walcar/bin/python -c 'import sys, cassandra.cython_deps as c; sys.exit(not c.HAVE_CYTHON)'

# Runtime stage: slim Python, the virtualenv, a non-root user. Numeric USER so the kubelet can
# verify runAsNonRoot; no writes needed (the chart runs it with readOnlyRootFilesystem).
FROM python:${PYTHON_VERSION}-slim
ARG UID=10001
RUN groupadd --system --gid ${UID} walcar \
    && useradd --system --uid ${UID} --gid ${UID} --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin walcar
COPY --from=build /opt/walcar /opt/walcar
ENV PATH=/opt/walcar/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
USER ${UID}:${UID}
# KV API, admin (health, readiness, metrics), memcached, CQL, injector webhook
EXPOSE 8080 9901 11211 9042 8443
ENTRYPOINT ["walcar"]
CMD ["--help"]
