# One image for the Ray head, the GPU workers and the API (deployed under Ray Serve).
#   docker build -t greenmim .                                   # CPU torch
#   docker build -t greenmim:cuda --build-arg BASE=nvidia/cuda:12.4.1-cudnn-runtime-ubuntu22.04 \
#       --build-arg PYTHON=python3.11 .                          # GPU workers
ARG BASE=python:3.11-slim
FROM ${BASE}
ARG PYTHON=python3

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    RAY_USAGE_STATS_ENABLED=0 RAY_AUTH_MODE=token
WORKDIR /opt/greenmim

COPY pyproject.toml README.md constraints.txt ./
COPY greenmim_core greenmim_core
COPY workers workers
COPY service service
# versions pinned by constraints.txt; the postgres extra: the driver for
# GREENMIM_DATABASE_URL=postgresql+psycopg://...
RUN ${PYTHON} -m pip install -c constraints.txt ".[postgres]" \
 && useradd --create-home --uid 1000 greenmim
USER greenmim
WORKDIR /home/greenmim

# 8000: the API (Ray Serve proxy). Ray's own ports (6379, 8265, ...) stay on the cluster network.
EXPOSE 8000
CMD ["greenmim", "--help"]
