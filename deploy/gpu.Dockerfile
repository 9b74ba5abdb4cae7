# syntax=docker/dockerfile:1
# Framecast on an NVIDIA GPU: the server on NVIDIA's TensorRT container (TensorRT, CUDA and cuDNN
# ready), TensorRT FP16, the model and engine cache on a volume, non-root.
# Build from the repository root:  docker build -f deploy/gpu.Dockerfile -t framecast-gpu .
# Run:  docker run --gpus all -p 50051:50051 -v framecast-cache:/var/cache/framecast framecast-gpu
#
# The tag is pinned: 25.01-py3 is TensorRT 10.8 on CUDA 12.8 with Python 3.12 (Ubuntu 24.04); it
# needs driver r570, or on data-center GPUs r535 or another branch CUDA 12 forward compatibility
# covers (NVIDIA's container release notes list them). Another: --build-arg TENSORRT_IMAGE=...
# The first start builds the engine (minutes) into the volume; later starts on the same GPU
# model load it. The CPU image is deploy/cpu.Dockerfile; the Kubernetes GPU overlay runs this one.
ARG TENSORRT_IMAGE=nvcr.io/nvidia/tensorrt:25.01-py3
FROM ${TENSORRT_IMAGE}

ENV UV_NO_CACHE=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    CUDA_HOME=/usr/local/cuda \
    PATH=/usr/local/cuda/bin:$PATH
WORKDIR /src
COPY pyproject.toml uv.lock ./
COPY client client
COPY oip oip
COPY server server
COPY deploy/install.sh deploy/install.sh
# /opt/framecast sees the container's TensorRT (system site packages; nothing installs a tensorrt
# wheel over it) and gets our packages at uv.lock's versions (deploy/install.sh, as the CPU
# image). pycuda builds from source against the container's CUDA toolkit. uv itself lives in a
# throwaway environment.
RUN python3 -m venv /opt/uv && /opt/uv/bin/pip install --quiet "uv==0.13.9" \
    && python3 -m venv --system-site-packages /opt/framecast \
    && UV=/opt/uv/bin/uv deploy/install.sh /opt/framecast \
    && /opt/uv/bin/uv pip install --python /opt/framecast/bin/python "pycuda==$(awk '/^name = "pycuda"$/ {getline; gsub(/"/, "", $3); print $3; exit}' uv.lock)" \
    && /opt/framecast/bin/python -c "import tensorrt, pycuda; print('TensorRT', tensorrt.__version__)" \
    && rm -rf /opt/uv /src
WORKDIR /

RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin framecast \
    && mkdir -p /var/cache/framecast \
    && chown 10001:10001 /var/cache/framecast
ENV PATH=/opt/framecast/bin:$PATH \
    FRAMECAST_CACHE_DIR=/var/cache/framecast \
    PYTHONUNBUFFERED=1
# Prepared models, built engines and TensorRT's timing cache survive restarts here.
VOLUME /var/cache/framecast
USER 10001:10001
EXPOSE 50051 8081 9100
# start-period covers the first engine build.
HEALTHCHECK --interval=10s --timeout=5s --start-period=1200s --retries=3 \
    CMD ["python", "-m", "framecast_server.healthcheck", "--port", "8081"]
# A sticky CUDA error makes serve exit with status 3: run with --restart unless-stopped (or under
# Kubernetes) so that a fresh process takes over. --workers auto feeds a big GPU from every core.
ENTRYPOINT ["framecast"]
# Plaintext gRPC on every interface (--insecure): publish it on a network you trust, or run
# with --tls-cert/--tls-key (and --auth-tokens) in place of --insecure (README, Deploying).
# 8081 serves grpc.health.v1 only, in plaintext, for the HEALTHCHECK (keep --health-port 8081
# in a command of your own); 9100 serves /metrics. --require-pretrained: the first start
# downloads the weights into the volume, and the server exits rather than serve random ones.
CMD ["serve", "--host", "0.0.0.0", "--port", "50051", "--insecure", "--health-port", "8081", \
     "--metrics-port", "9100", "--workers", "auto", "--require-pretrained", "--backend", "tensorrt"]
