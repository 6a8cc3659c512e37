#!/usr/bin/env sh
# Regenerates the pinned dependency sets that the Docker images install (see Dockerfile).
#
#   pip install uv==0.13.9     # once; any recent uv works
#   requirements/lock.sh             # re-resolve, keeping the current pins where they still fit
#   requirements/lock.sh --upgrade   # move every pin to the newest allowed release
#
# It reads only pyproject.toml (the project itself is never built), so it runs on any machine
# that reaches PyPI. The resolution is universal (markers, not this machine's platform), so
# the same files serve amd64 and arm64 builds. PYTHON_VERSION must match the Dockerfile's
# base image; tests/test_deploy.py checks that.
set -eu
cd "$(dirname "$0")/.."

UV="${UV:-uv}"
PYTHON_VERSION=3.11

lock() {
    out="$1"
    shift
    "$UV" pip compile pyproject.toml "$@" \
        --universal --python-version "$PYTHON_VERSION" \
        --custom-compile-command "requirements/lock.sh" \
        --quiet --output-file "requirements/$out"
}

# The client image also reads PNG/JPEG files, hence [images]; it never gets TensorFlow.
lock client.lock --extra images "$@"
lock server.lock --extra server "$@"
lock trainer.lock --extra trainer "$@"
