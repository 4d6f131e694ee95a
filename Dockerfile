# syntax=docker/dockerfile:1
#
# One image for every sysdesign process:
#   sysdesign serve --services shortener     a gRPC service (one Deployment per system)
#   sysdesign worker blobgc                  a background worker
#   sysdesign edge                           the HTTP edge
#   sysdesign migrate --apply                the schema Job
#   sysdesign up                             everything, embedded backends (docker run -p 50051:50051 -p 8080:8080)
#
# Build:  make image   (docker build -t sysdesign:dev .)
# Check:  make image-check   (builds it with podman on a local Debian bookworm
#         base, then runs every workload of the kind overlay from it)
#
# Stage one builds wheels for the project and all of its runtime dependencies
# (never the dev extra); stage two installs them into a slim Python with no
# compiler, pip cache or source tree, and runs as an unprivileged numeric user
# so Kubernetes can verify runAsNonRoot. Nothing is written outside /tmp when
# the backends are configured, so the root filesystem can be read-only.
#
# PYTHON_IMAGE is any Debian bookworm with Python 3.11 and its venv module:
# the official python image, or Debian's own python3.11 + python3-venv (whose
# python3 has no top-level pip and is "externally managed"). Both stages
# therefore work in a virtualenv, /opt/sysdesign, which is first on PATH.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PATH=/opt/sysdesign/bin:$PATH
# A compiler for any dependency that ships no wheel for this platform.
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential \
 && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/sysdesign
WORKDIR /src
COPY pyproject.toml README.md ./
COPY servers ./servers
COPY clients ./clients
COPY generated ./generated
RUN pip wheel --wheel-dir /wheels . \
 && sha256sum /wheels/*.whl > /wheels.sha256

FROM ${PYTHON_IMAGE} AS runtime
# matplotlib (benchmark plots) wants a writable config dir: /tmp. Listen on
# every interface; `sysdesign up` keeps its data in /data.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    MPLCONFIGDIR=/tmp/matplotlib \
    SYSDESIGN_GRPC_ADDR=0.0.0.0:50051 \
    SYSDESIGN_HTTP_ADDR=0.0.0.0:8080 \
    SYSDESIGN_METRICS_ADDR=0.0.0.0:9464 \
    SYSDESIGN_DATA_DIR=/data \
    PATH=/opt/sysdesign/bin:$PATH
RUN python3 -m venv /opt/sysdesign \
 && groupadd --system --gid 10001 sysdesign \
 && useradd --system --uid 10001 --gid 10001 --home-dir /nonexistent --no-create-home \
      --shell /usr/sbin/nologin sysdesign \
 && install -d -o 10001 -g 10001 /data
# The wheels are bind-mounted from stage one, so they never land in a layer.
# Their checksums are copied first: podman (buildah) keys its layer cache for
# a RUN --mount=from=<stage> on the command alone, so without them a rebuilt
# wheel would not be installed again.
COPY --from=build /wheels.sha256 /opt/sysdesign/wheels.sha256
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-index --find-links=/wheels sysdesign \
 && sysdesign --help > /dev/null
USER 10001:10001
WORKDIR /data
# gRPC, the HTTP edge, metrics, and the card processor's stand-in (sim-psp).
EXPOSE 50051 8080 9464 12111
ENTRYPOINT ["sysdesign"]
CMD ["up"]
