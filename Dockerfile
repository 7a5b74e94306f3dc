# One image recipe for every service; EXTRAS picks the service's optional dependency group.
# Built by compose.yaml (one container per service).
FROM python:3.11-slim-bookworm

ARG EXTRAS=gateway
ENV PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    MOCAP_MODEL_DIR=/models

WORKDIR /app
COPY pyproject.toml README.md ./
COPY protos ./protos
COPY mocap_common ./mocap_common
COPY gateway ./gateway
COPY tracker_svc ./tracker_svc
COPY smoother_svc ./smoother_svc
COPY exporter_svc ./exporter_svc
COPY resource_svc ./resource_svc

# Generate the gRPC code, then install the service's dependency group.
RUN pip install --no-cache-dir grpcio-tools==1.85.1 \
 && mkdir -p mocap/v1 \
 && python -m grpc_tools.protoc -Iprotos --python_out=. --pyi_out=. --grpc_python_out=. protos/mocap/v1/*.proto \
 && touch mocap/__init__.py mocap/v1/__init__.py \
 && pip install --no-cache-dir ".[${EXTRAS}]"

# The tracker's image carries the BlazePose weights (extracted from the mediapipe wheel, checksummed).
RUN if echo "${EXTRAS}" | grep -q tracker; then python -m tracker_svc.model_setup --cache /models; fi

VOLUME ["/data"]
