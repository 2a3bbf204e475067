# syntax=docker/dockerfile:1
# Guardgate container image.
#
#   docker build -t guardgate .                               # CPU (portable baseline)
#   docker build --build-arg VARIANT=cuda -t guardgate:cuda .  # NVIDIA GPU (run with --gpus all)
#   docker run -p 8080:8080 -v guard-models:/models -e OPENAI_API_KEY guardgate serve --host 0.0.0.0 \
#       --upstream https://api.openai.com/v1 --upstream-key-env OPENAI_API_KEY --policy default
#
# The install step is `bash scripts/install.sh run` (what CI exercises outside Docker) plus the
# extras in EXTRAS. llama.cpp is compiled with GGML_NATIVE=OFF, so the binary does not depend on
# the build machine's CPU: on x86-64 it targets AVX2/FMA/F16C (x86-64-v3, 2013+ CPUs); for older
# CPUs add e.g. --build-arg CMAKE_EXTRA="-DGGML_AVX2=OFF -DGGML_FMA=OFF -DGGML_F16C=OFF -DGGML_BMI2=OFF".
# Guard models are not baked in: mount them at /models (GUARDGATE_MODELS_DIR) and pull them with
# `docker run ... guardgate models pull NAME`.

ARG VARIANT=cpu
ARG PYTHON_VERSION=3.12
ARG CUDA_VERSION=12.6.3

# ------------------------------------------------------------------ build stages (one per variant)
FROM python:${PYTHON_VERSION}-slim-bookworm AS build-cpu
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential cmake git \
 && rm -rf /var/lib/apt/lists/*
ENV GG_CMAKE_VARIANT=""

FROM nvidia/cuda:${CUDA_VERSION}-devel-ubuntu24.04 AS build-cuda
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-dev build-essential cmake git \
 && rm -rf /var/lib/apt/lists/*
# The driver library (libcuda.so.1) exists only at run time (--gpus): let executables link without it.
ENV GG_CMAKE_VARIANT="-DGGML_CUDA=on -DCMAKE_EXE_LINKER_FLAGS=-Wl,--allow-shlib-undefined"

FROM build-${VARIANT} AS build
ARG EXTRAS=promptguard
ARG CMAKE_EXTRA=""
WORKDIR /app
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH PIP_DISABLE_PIP_VERSION_CHECK=1
COPY pyproject.toml README.md ./
COPY scripts/install.sh scripts/install.sh
COPY gateway gateway
RUN --mount=type=cache,target=/root/.cache/pip \
    export CMAKE_ARGS="-DLLAVA_BUILD=OFF -DGGML_NATIVE=OFF ${GG_CMAKE_VARIANT} ${CMAKE_EXTRA}" \
 && bash scripts/install.sh run \
 && if [ -n "${EXTRAS}" ]; then python -m pip install -e ".[${EXTRAS}]"; fi \
 && python -c "import gateway.server" \
 && if [ -z "${GG_CMAKE_VARIANT}" ]; then python -c "import llama_cpp"; fi

# ------------------------------------------------------------------ runtime stages
FROM python:${PYTHON_VERSION}-slim-bookworm AS run-cpu
RUN apt-get update \
 && apt-get install -y --no-install-recommends libgomp1 \
 && rm -rf /var/lib/apt/lists/*

FROM nvidia/cuda:${CUDA_VERSION}-runtime-ubuntu24.04 AS run-cuda
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 libgomp1 \
 && rm -rf /var/lib/apt/lists/*

FROM run-${VARIANT}
# Editable install: the venv points at /app, so both keep the paths they were built with.
COPY --from=build /opt/venv /opt/venv
COPY --from=build /app /app
COPY policies /app/policies
COPY guards_gguf/manifest.yaml /app/guards_gguf/manifest.yaml
RUN useradd --system --uid 10001 --home-dir /app --shell /usr/sbin/nologin guardgate \
 && mkdir -p /models /data \
 && chown guardgate /models /data
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    GUARDGATE_MODELS_DIR=/models \
    GUARDGATE_MANIFEST=/app/guards_gguf/manifest.yaml
WORKDIR /app
VOLUME ["/models", "/data"]
USER 10001
EXPOSE 8080
HEALTHCHECK --interval=15s --timeout=3s --start-period=120s --retries=3 \
  CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8080/readyz', timeout=2).status != 200)"]
ENTRYPOINT ["guardgate"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8080"]
