# flawscope inspection service, CPU only.
#   docker build -t flawscope .
#   docker run -p 8000:8000 -v "$PWD/models:/models:ro" flawscope
# The model is mounted read-only at /models/model.safetensors (what `flawscope fit ... -o
# models/model.safetensors` writes; another model file or an exported .onnx: give its path in a
# different CMD). The service records every verdict; by default in a SQLite file inside the
# container, lost with it: pass `--db postgresql://...` for records that outlive it. Run as
# many copies as needed behind a load balancer (docs/service.md, "Running several workers").
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /opt/flawscope

# CPU build of PyTorch first (from PyTorch's CPU wheel index: no CUDA libraries, ~1 GB less),
# so that installing flawscope finds it already satisfied. Bounds as in pyproject.toml.
RUN pip install --index-url https://download.pytorch.org/whl/cpu \
        "torch>=2.4,<=2.14.1" "torchvision>=0.19,<=0.29.1"

COPY pyproject.toml README.md ./
COPY src ./src
RUN pip install ".[serve]" && rm -rf /opt/flawscope/src /opt/flawscope/build

# non-root user; the model folder is a mount point (read-only is enough)
RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin flawscope \
    && mkdir -p /models && chown flawscope /models
USER flawscope
WORKDIR /home/flawscope
VOLUME ["/models"]
EXPOSE 8000

# liveness: GET /healthz answers {"status": "ok", ...} once the model is loaded
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"]

CMD ["flawscope", "serve", "/models/model.safetensors", "--host", "0.0.0.0"]
