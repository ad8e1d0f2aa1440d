# The image k8s/rayservice.yaml runs: the repository installed like `make install` does (the
# CPU wheel of torch first), with the ONNX variants of deploy/cluster.yaml built at image build
# time, so pods start without building them. Build from the repository root:
#   docker build -t loraserve:latest .
FROM python:3.11-slim
WORKDIR /app
RUN apt-get update -qq && apt-get install -y -qq --no-install-recommends wget && rm -rf /var/lib/apt/lists/*
COPY pyproject.toml constraints.txt README.md ./
COPY serve serve
COPY models models
RUN pip install -q torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu \
 && pip install -q -c constraints.txt ".[onnx]"
COPY deploy deploy
COPY adapters adapters
ENV LORASERVE_HOME=/app HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
RUN loraserve export --config deploy/cluster.yaml
