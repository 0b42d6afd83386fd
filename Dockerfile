# syntax=docker/dockerfile:1
# Targets from one file:
#   api              the search service: onnxruntime + tokenizers, no torch; non-root; runs with a
#                    read-only root filesystem (writes only /data and /tmp, both volumes).
#   api-with-models  the api with its query encoder baked in (build arg QUERY_MODEL, from the named
#                    build context `models`):
#                      docker build --target api-with-models --build-context models=var/models \
#                        --build-arg QUERY_MODEL=multilingual-e5-small-onnx-int8 -t medsearch-api .
#   indexer          model building and document encoding: torch (the CPU build) + transformers.
# Both install exactly their lock (requirements/service.txt, requirements/indexer.txt; `make lock`).
# Weights are never fetched at run time: mount a models directory built by `medsearch models build`
# at /data/models (or bake the query encoder in, above).

ARG PYTHON_IMAGE=python:3.11.13-slim-bookworm

# --- build: the locked dependencies and the product, so no runtime stage needs a compiler ---
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
# Only what the package is made of, and its lock: the image's files are exactly these
# (tests/test_images.py reads this list and runs the same pip commands over the same files).
COPY pyproject.toml README.md ./
COPY requirements ./requirements
COPY security/lock.py /tmp/lock.py
COPY settings ./settings
COPY models ./models
COPY store ./store
COPY indexer ./indexer
COPY service ./service
COPY medsearch ./medsearch
# Each venv installs exactly its lock (hash-checked, nothing resolved), then the product without
# dependencies or build isolation (its build backend is in the lock too). A lock made from another
# pyproject.toml stops the build here in one line naming `make lock`.
RUN python /tmp/lock.py --root /src check
RUN python -m venv /opt/api \
    && /opt/api/bin/pip install --no-compile --require-hashes --no-deps -r requirements/service.txt \
    && /opt/api/bin/pip install --no-compile --no-deps --no-build-isolation .

# The locked torch is the CPU build (2.13.0+cpu), published on PyTorch's CPU index; the hash in the
# lock admits only that file. A CUDA image needs a lock of its own (not made yet: README, "Installs").
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
RUN python -m venv /opt/indexer \
    && /opt/indexer/bin/pip install --no-compile --require-hashes --no-deps \
        --extra-index-url "${TORCH_INDEX_URL}" -r requirements/indexer.txt \
    && /opt/indexer/bin/pip install --no-compile --no-deps --no-build-isolation '.[index]'

# --- runtime base: a user, the data directory, no build tools ---
FROM ${PYTHON_IMAGE} AS runtime
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    MEDSEARCH_HOME=/data MEDSEARCH_HOST=0.0.0.0 HOME=/tmp
RUN useradd --no-create-home --uid 10001 --user-group medsearch \
    && mkdir -p /data/models \
    && chown -R medsearch:medsearch /data
WORKDIR /data
VOLUME ["/data", "/tmp"]

FROM runtime AS api
COPY --from=build /opt/api /opt/api
ENV PATH=/opt/api/bin:$PATH
USER 10001
EXPOSE 8000
# Liveness only: /healthz answers while the process can serve HTTP. Readiness (/readyz: encoder
# loaded, collection reachable and compatible) is for load balancers and Kubernetes, not restarts.
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2).status != 200)"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["medsearch"]
CMD ["serve"]

FROM api AS api-with-models
ARG QUERY_MODEL=embeddinggemma-300m-k4-query-onnx-int8
# `models` is a named build context (--build-context models=DIR), which hadolint cannot see.
# hadolint ignore=DL3022
COPY --from=models --chown=10001:10001 ${QUERY_MODEL} /data/models/${QUERY_MODEL}
ENV MEDSEARCH_QUERY_MODEL=${QUERY_MODEL}

FROM runtime AS indexer
COPY --from=build /opt/indexer /opt/indexer
ENV PATH=/opt/indexer/bin:$PATH
COPY --chown=10001:10001 data/demo /data/demo
USER 10001
ENTRYPOINT ["medsearch"]
CMD ["index", "/data/demo/corpus.jsonl", "--keyword-field", "department"]
