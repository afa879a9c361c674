# GPU worker image: quantdag and its [gpu] extra on CUDA, run as a non-root user.
# Build from the repository root (the top-level .dockerignore decides what is sent):
#   docker build -f infra/worker.Dockerfile -t quantdag-worker .
# compose.yaml starts it as `prefect worker start --pool gpu --type process`; the
# Kubernetes work pool (infra/k8s/base-job-template.json) runs flow runs in it.
#
# CUDA_IMAGE must be a *devel* image (modelopt JIT-compiles a CUDA extension with
# nvcc on first use) whose CUDA major version matches the torch wheel that pip
# resolves from pyproject.toml; torch 2.14 on PyPI is built for CUDA 13.0. A build
# step below stops the build when they differ. Ubuntu 24.04 brings Python 3.12.
ARG CUDA_IMAGE=nvidia/cuda:13.0.2-cudnn-devel-ubuntu24.04
FROM ${CUDA_IMAGE}

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:${PATH}

# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        python3.12 python3.12-venv python3.12-dev build-essential ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3.12 -m venv /opt/venv

WORKDIR /app

# Dependencies first, read from pyproject.toml alone, so that a source change does
# not download torch again.
COPY pyproject.toml ./
RUN --mount=type=cache,target=/root/.cache/pip \
    python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; print('\n'.join(p['dependencies'] + p['optional-dependencies']['gpu']))" \
        > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt

# Fail here, not 50 s into the first GPU run, when nvcc and torch disagree on CUDA.
RUN python -c "import re, subprocess, sys, torch; \
out = subprocess.run(['nvcc', '--version'], capture_output=True, text=True, check=True).stdout; \
nvcc = re.search(r'release (\d+\.\d+)', out).group(1); \
cu = torch.version.cuda or 'none'; \
print('torch', torch.__version__, 'CUDA', cu, 'nvcc', nvcc); \
cu.split('.')[0] == nvcc.split('.')[0] or sys.exit(f'torch is built for CUDA {cu}, nvcc is {nvcc}: pick a matching CUDA_IMAGE')"

# The project itself (packages, conf/, README) without touching the pinned deps.
COPY . .
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install --no-deps . \
    && pip check

RUN groupadd --gid 10001 quantdag \
    && useradd --create-home --uid 10001 --gid 10001 --shell /bin/bash quantdag \
    && mkdir -p /cache/huggingface /cache/quantdag /cache/torch_extensions \
    && chown -R 10001:10001 /cache
ENV HF_HOME=/cache/huggingface \
    QUANTDAG_HOME=/cache/quantdag \
    TORCH_EXTENSIONS_DIR=/cache/torch_extensions
# Numeric, so that Kubernetes' runAsNonRoot can check it.
USER 10001:10001

CMD ["prefect", "worker", "start", "--pool", "gpu", "--type", "process", "--with-healthcheck"]
