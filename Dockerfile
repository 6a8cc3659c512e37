# syntax=docker/dockerfile:1
#
# One file, three images (the last stage, server, is the default target):
#
#   docker build --target server  -t mnist-serving/server:0.1.0  .   # mnist-serve, LiteRT, no TensorFlow
#   docker build --target trainer -t mnist-serving/trainer:0.1.0 .   # mnist-train, TensorFlow + LiteRT + matplotlib
#   docker build --target client  -t mnist-serving/client:0.1.0  .   # mnist-client, no TensorFlow
#
# Builder stages install each role's pinned dependencies (requirements/*.lock, made by
# requirements/lock.sh) into /opt/venv; the final stages copy only that venv onto a clean
# slim base. To pin the base by digest as well: --build-arg PYTHON_IMAGE=python:3.11-slim-bookworm@sha256:...
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS base
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1

# The project as one pure-Python wheel. setuptools refuses to build unless every package
# folder named in pyproject.toml is present, so all of them are copied, whatever the role.
FROM base AS wheel
WORKDIR /src
COPY pyproject.toml README.md ./
COPY protos/ protos/
COPY contract/ contract/
COPY trainer/ trainer/
COPY server/ server/
COPY client/ client/
RUN pip wheel --no-deps --wheel-dir /wheels .

# One venv per role. The lock goes in first, alone, so that a code change does not reinstall
# TensorFlow. The venv has no pip of its own: the base image's pip installs into it.
# The last step installs the project's own wheel with --no-index, so nothing outside the lock
# can come in: the build fails if the lock lacks anything the extra needs, and `pip check`
# fails it on any version conflict. (Hence hadolint's DL3013, "pin versions", is waived.)
FROM base AS client-venv
COPY requirements/client.lock /tmp/requirements.lock
RUN python -m venv --without-pip /opt/venv \
    && pip --python /opt/venv/bin/python install --requirement /tmp/requirements.lock
COPY --from=wheel /wheels /wheels
# hadolint ignore=DL3013
RUN pip --python /opt/venv/bin/python install --no-index --find-links /wheels "mnist-serving[images]" \
    && pip --python /opt/venv/bin/python check

# The lean server: the [server] extra runs each version's LiteRT twin and has no TensorFlow
# (a version without a twin is refused with a log line; an image that must serve such
# versions installs "mnist-serving[server,tensorflow]" from a lock that includes it).
FROM base AS server-venv
COPY requirements/server.lock /tmp/requirements.lock
RUN python -m venv --without-pip /opt/venv \
    && pip --python /opt/venv/bin/python install --requirement /tmp/requirements.lock
COPY --from=wheel /wheels /wheels
# hadolint ignore=DL3013
RUN pip --python /opt/venv/bin/python install --no-index --find-links /wheels "mnist-serving[server]" \
    && pip --python /opt/venv/bin/python check

FROM base AS trainer-venv
COPY requirements/trainer.lock /tmp/requirements.lock
RUN python -m venv --without-pip /opt/venv \
    && pip --python /opt/venv/bin/python install --requirement /tmp/requirements.lock
COPY --from=wheel /wheels /wheels
# hadolint ignore=DL3013
RUN pip --python /opt/venv/bin/python install --no-index --find-links /wheels "mnist-serving[trainer]" \
    && pip --python /opt/venv/bin/python check

# What every final image shares: tini as PID 1 (forwards SIGTERM to Python, reaps children),
# a fixed non-root uid, and /models owned by it. A fresh named volume mounted on /models
# takes that ownership, which lets the non-root trainer write its exports there.
FROM base AS runtime
# The base tag fixes the Debian release, and with it tini's version (DL3008 waived).
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install --yes --no-install-recommends tini \
    && rm -rf /var/lib/apt/lists/*
RUN groupadd --system --gid 10001 mnist \
    && useradd --system --uid 10001 --gid mnist --create-home --home-dir /home/mnist \
        --shell /usr/sbin/nologin mnist \
    && mkdir /models \
    && chown mnist:mnist /models
# The venv is root-owned and read-only to the app user, so no bytecode can be written there.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /home/mnist
USER 10001:10001
STOPSIGNAL SIGTERM

FROM runtime AS client
COPY --from=client-venv /opt/venv /opt/venv
ENTRYPOINT ["/usr/bin/tini", "--", "mnist-client"]
CMD ["--help"]

FROM runtime AS trainer
COPY --from=trainer-venv /opt/venv /opt/venv
ENV MPLBACKEND=Agg
ENTRYPOINT ["/usr/bin/tini", "--", "mnist-train"]
CMD ["--model-dir", "/models/mnist"]

FROM runtime AS server
COPY --from=server-venv /opt/venv /opt/venv
ENV MNIST_SERVING_MODEL_DIR=/models/mnist
EXPOSE 8500 8501
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 \
    CMD ["mnist-client", "health", "--target", "localhost:8500"]
ENTRYPOINT ["/usr/bin/tini", "--", "mnist-serve"]
