# Framecast on an NVIDIA GPU, on NVIDIA's TensorRT container (TensorRT, CUDA and cuDNN ready).
#
#   docker build -f deploy/gpu.Dockerfile -t framecast-gpu .
#   docker run --gpus all -p 50051:50051 -v framecast-cache:/var/cache/framecast framecast-gpu
#
# The tag is pinned: 25.01-py3 is TensorRT 10.8 on CUDA 12.8 with Python 3.12 (Ubuntu 24.04); it
# needs driver r570, or on data-center GPUs r535 or another branch CUDA 12 forward compatibility
# covers (NVIDIA's container release notes list them). Another tag: --build-arg TENSORRT_IMAGE=...
# The engine is built on first start (minutes) into the volume and reused by later containers
# on the same GPU model.
ARG TENSORRT_IMAGE=nvcr.io/nvidia/tensorrt:25.01-py3
FROM ${TENSORRT_IMAGE}

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    CUDA_HOME=/usr/local/cuda

# A virtual environment that sees the container's own TensorRT (system site packages): nothing
# here installs a `tensorrt` wheel over it.
RUN python3 -m venv --system-site-packages /opt/framecast
ENV PATH=/opt/framecast/bin:/usr/local/cuda/bin:$PATH

COPY client /src/client
COPY server /src/server
# pycuda builds from source against the container's CUDA toolkit (nvcc is in the image).
RUN pip install "pycuda>=2024.1.2" /src/client /src/server \
    && python -c "import tensorrt, pycuda; print('TensorRT', tensorrt.__version__)" \
    && rm -rf /src

RUN useradd --create-home --uid 10001 framecast \
    && mkdir -p /var/cache/framecast \
    && chown framecast /var/cache/framecast
USER framecast
# Prepared model, built engines and TensorRT's timing cache (engines are per GPU model).
VOLUME ["/var/cache/framecast"]
EXPOSE 50051

ENTRYPOINT ["framecast", "serve", "--backend", "tensorrt", "--host", "0.0.0.0", "--port", "50051", "--cache-dir", "/var/cache/framecast"]
