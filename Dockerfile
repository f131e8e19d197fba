# syntax=docker/dockerfile:1
# One source tree, two targets:
#   api     FastAPI under uvicorn; no torch (the API never imports it)
#   worker  Celery worker with PyTorch; the torch wheel from PyPI bundles the CUDA runtime, so the host only
#           needs the NVIDIA driver and the container toolkit (compose reserves the GPU)
# The web viewer's NiiVue bundle, as `make install` makes it: npm ci from the lockfile, dist/index.js checked
# against the recorded sha256 (api/ui/vendor/); no node in the final images
FROM node:20-bookworm-slim AS ui-vendor
WORKDIR /vendor
COPY api/ui/vendor/package.json api/ui/vendor/package-lock.json api/ui/vendor/niivue.sha256 ./
RUN npm ci --ignore-scripts --no-audit --no-fund --loglevel=error \
 && cp node_modules/@niivue/niivue/dist/index.js niivue.js \
 && echo "$(cat niivue.sha256)  niivue.js" | sha256sum -c --quiet

FROM python:3.11-slim AS base
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN useradd --create-home --uid 10001 msgldm
WORKDIR /app
COPY pyproject.toml README.md alembic.ini ./
COPY api ./api
COPY --from=ui-vendor /vendor/niivue.js ./api/ui/vendor/niivue.js
COPY worker ./worker
COPY migrations ./migrations
COPY ops ./ops
# the model package's source in both images: the API reads the serving checkpoint's config.json and validates
# training datasets with `python -m model.data` (numpy + nibabel only); only the worker installs torch
COPY model ./model

FROM base AS api
RUN pip install -e . && mkdir -p /app/var && chown msgldm /app/var
USER msgldm
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --retries=3 \
  CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2)"
CMD ["uvicorn", "api.main:app", "--host", "0.0.0.0", "--port", "8000", "--proxy-headers"]

FROM base AS worker
RUN pip install -e '.[model]' && mkdir -p /app/var && chown msgldm /app/var
USER msgldm
# One process per GPU: concurrency 1, the model loaded in the pool child after the fork.
CMD ["celery", "-A", "worker.app", "worker", "-Q", "inference", "-c", "1", "--loglevel", "INFO"]
