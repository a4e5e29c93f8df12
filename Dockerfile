# The gateway image: Envoy + the Floodwall processor (no Triton, no torch). Built with the same
# install script CI uses, in its runtime-only mode. Triton runs beside it: on GPU hosts in
# NVIDIA's image (nvcr.io/nvidia/tritonserver) on the same triton_models/ repository.
#
#   docker build -t floodwall .
#   docker run --rm -p 8080:8080 -e REDIS_URL=redis://redis:6379 \
#       -e TRITON_HOST=triton floodwall
FROM python:3.11-slim-bookworm

WORKDIR /opt/floodwall
COPY pyproject.toml README.md ./
COPY proxy ./proxy
COPY filters ./filters
COPY scripts ./scripts
COPY examples ./examples
COPY triton_models ./triton_models
RUN ./scripts/setup.sh --no-models && rm -rf /root/.cache/pip /var/lib/apt/lists/*

ENV PATH=/opt/floodwall/.venv/bin:$PATH
# 8080 gateway, 9901 Envoy admin, 9090 processor /metrics
EXPOSE 8080 9901 9090
# `floodwall up` supervises the processor(s) and Envoy; it starts neither Redis nor Triton
# with this config (both are external).
CMD ["floodwall", "up", "-c", "/opt/floodwall/examples/docker.yaml"]
