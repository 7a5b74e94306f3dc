# One image recipe for every service; EXTRAS picks the service's optional dependency group.
# Built by compose.yaml (one container per service). Each image holds the project's wheel with
# only its service's extra: services never import each other, and every service starts with only
# its own extra (tests/common/test_service_installs.py proves it for all five).

# --- stage 1: generated gRPC code + the project's wheel (grpcio-tools stays in this stage) ------
FROM python:3.11-slim-bookworm AS wheel
ENV PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY protos ./protos
COPY mocap_common ./mocap_common
COPY gateway ./gateway
COPY tracker_svc ./tracker_svc
COPY smoother_svc ./smoother_svc
COPY exporter_svc ./exporter_svc
COPY resource_svc ./resource_svc
# The API imports google/api and google/rpc protos: protoc reads them from the googleapis-common-protos
# wheel (the version pyproject.toml pins; the runtime imports its _pb2 modules), and generates no
# Python for them.
RUN pip install --no-cache-dir grpcio-tools==1.85.1 googleapis-common-protos==1.76.0 \
 && mkdir -p mocap/v1 \
 && googleapis="$(python -c 'import os, google.api.field_behavior_pb2 as m; print(os.path.dirname(os.path.dirname(os.path.dirname(m.__file__))))')" \
 && python -m grpc_tools.protoc -I"$googleapis" -Iprotos --python_out=. --pyi_out=. --grpc_python_out=. protos/mocap/v1/*.proto \
 && touch mocap/__init__.py mocap/v1/__init__.py \
 && pip wheel --no-cache-dir --no-deps . -w /wheels

# --- stage 2: one service ---------------------------------------------------------------------
FROM python:3.11-slim-bookworm
ARG EXTRAS=gateway
ENV PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    MOCAP_MODEL_DIR=/models

# A non-editable install of the wheel, and no source tree on sys.path: the service runs from
# site-packages with exactly the package data the wheel carries (pyproject.toml's
# [tool.setuptools.package-data]: the smoother's training motion and noise model, the demo clip).
COPY --from=wheel /wheels /wheels
RUN pip install --no-cache-dir "$(ls /wheels/mocap_mesh-*.whl)[${EXTRAS}]" && rm -rf /wheels

# The tracker's image carries the BlazePose weights (extracted from the mediapipe wheel, checksummed).
RUN if [ "${EXTRAS}" = tracker ]; then python -m tracker_svc.model_setup --cache /models; fi

WORKDIR /app
VOLUME ["/data"]
