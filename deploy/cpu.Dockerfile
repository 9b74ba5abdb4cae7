# syntax=docker/dockerfile:1
# Framecast's CPU image: ONNX Runtime, one worker per core, the model cache on a volume, non-root.
# Build from the repository root:  docker build -f deploy/cpu.Dockerfile -t framecast-cpu .
# The GPU image (TensorRT) is deploy/gpu.Dockerfile.

FROM python:3.12-slim-bookworm AS build
ENV UV_NO_CACHE=1 PIP_NO_CACHE_DIR=1
RUN python3 -m pip install "uv==0.13.9"
WORKDIR /src
COPY pyproject.toml uv.lock ./
COPY client client
COPY oip oip
COPY server server
COPY deploy/install.sh deploy/install.sh
# The same commands tests/deploy/test_images.py runs into a fresh virtual environment.
RUN python3 -m venv /opt/framecast && deploy/install.sh /opt/framecast

FROM python:3.12-slim-bookworm
COPY --from=build /opt/framecast /opt/framecast
RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin framecast \
    && mkdir -p /var/cache/framecast \
    && chown 10001:10001 /var/cache/framecast
ENV PATH=/opt/framecast/bin:$PATH \
    FRAMECAST_CACHE_DIR=/var/cache/framecast \
    PYTHONUNBUFFERED=1
# Prepared models (and, on GPU hosts, engines) survive restarts here.
VOLUME /var/cache/framecast
USER 10001:10001
EXPOSE 50051 8081 9100
HEALTHCHECK --interval=10s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-m", "framecast_server.healthcheck", "--port", "8081"]
ENTRYPOINT ["framecast"]
# Plaintext gRPC on every interface (--insecure): publish it on a network you trust, or run
# with --tls-cert/--tls-key (and --auth-tokens) in place of --insecure (README, Deploying).
# 8081 serves grpc.health.v1 only, in plaintext, for the HEALTHCHECK (keep --health-port 8081
# in a command of your own); 9100 serves /metrics. --require-pretrained: the first start
# downloads the weights into the volume, and the server exits rather than serve random ones.
CMD ["serve", "--host", "0.0.0.0", "--port", "50051", "--insecure", "--health-port", "8081", \
     "--metrics-port", "9100", "--workers", "auto", "--require-pretrained"]
