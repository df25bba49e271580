# GPU image for imagegen: Ray 2.60 on CUDA 12.8 and Python 3.11, the CUDA build of
# torch 2.13.0, and this project (installed editable at /home/ray/imagegen, so the
# relative config paths in config/*.yaml resolve against the project).
#
#   docker build -t imagegen:latest .
#
# One GPU machine (Ray starts inside the container; weights under /srv/models; it serves
# on 0.0.0.0, so it needs API keys: API_KEYS, or a keys file mounted and named by
# IMAGEGEN_API_KEYS_FILE; ALLOW_ANONYMOUS=1 serves openly on purpose):
#   docker run --gpus all --shm-size=8g -p 3003:3003 \
#     -e API_KEYS="alice:$(imagegen keys new --bare)" -v /srv/models:/models imagegen:latest
#   # smoke test without weights: add -e IMAGEGEN_DEFAULT_MODEL=tiny-sd
#
# On Kubernetes, config/rayservice.yaml runs this image; KubeRay replaces CMD with its own
# `ray start`. cluster.yaml uses the same base image and installs the project at setup.
ARG RAY_IMAGE=rayproject/ray:2.60.0-py311-cu128
FROM ${RAY_IMAGE}

# The CUDA build of the pinned torch first: the project pins torch==2.13.0, which this
# wheel satisfies, so installing the project afterwards keeps it (an unpinned install
# would pull whatever torch PyPI resolves).
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
RUN pip install --no-cache-dir "torch==2.13.0" --index-url "${TORCH_INDEX_URL}"

WORKDIR /home/ray/imagegen
COPY --chown=ray:users pyproject.toml README.md ./
COPY --chown=ray:users serve_app ./serve_app
COPY --chown=ray:users deployments ./deployments
COPY --chown=ray:users imagegen ./imagegen
COPY --chown=ray:users config ./config
RUN pip install --no-cache-dir -e . \
    && python -c "import torch; assert torch.__version__.split('+')[0] == '2.13.0', torch.__version__"

# MODEL_PATH defaults to /models: mount the weights there.
# The store is left to the serve config (redis on clusters): an IMAGEGEN_STORE here would
# override it on every KubeRay pod too.
EXPOSE 3003 8265

# Serve's fast path (HAProxy in front of ingress replicas that answer HTTP themselves, gRPC
# between deployments): read by every Ray process this image starts.
ENV RAY_SERVE_THROUGHPUT_OPTIMIZED=1 RAY_SERVE_ENABLE_HA_PROXY=1

# Single node: SQLite job store unless IMAGEGEN_STORE says otherwise (no Redis here).
CMD ["bash", "-c", "IMAGEGEN_STORE=${IMAGEGEN_STORE:-sqlite} exec serve run config/serve.gpu.yaml"]
