# syntax=docker/dockerfile:1
# Two targets from one file:
#   api     - the search service: onnxruntime + tokenizers, no torch (slim).
#   indexer - model building and document encoding: adds torch (CPU) and transformers.
# Weights are never fetched at run time: mount a models directory built by `medsearch models build`
# at /data/models (or bake one in with a derived image).

FROM python:3.11-slim AS base
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    MEDSEARCH_HOME=/data MEDSEARCH_HOST=0.0.0.0
RUN useradd --create-home --uid 10001 medsearch && mkdir -p /data && chown medsearch /data
WORKDIR /app
COPY pyproject.toml README.md ./
COPY settings ./settings
COPY models ./models
COPY store ./store
COPY indexer ./indexer
COPY service ./service
COPY evaluation ./evaluation
COPY medsearch ./medsearch

FROM base AS api
RUN pip install .
USER medsearch
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s \
    CMD python -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/readyz').status != 200)"
CMD ["medsearch", "serve"]

FROM base AS indexer
RUN pip install --index-url https://download.pytorch.org/whl/cpu torch==2.13.0 && pip install '.[index]'
COPY data ./data
USER medsearch
ENTRYPOINT ["medsearch"]
CMD ["index", "data/demo/corpus.jsonl", "--keyword-field", "department"]
