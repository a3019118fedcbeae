# topro image for Ray on Kubernetes (KubeRay): Ray's official image + the project.
# The k8s/ manifests run it for the Ray head and workers, the RayJob submitter and
# the MLflow tracking server. Build from the repository root (see k8s/README.md):
#
#   docker build -t REGISTRY/topro:0.1.0-py311-cpu .
#   docker build --build-arg RAY_IMAGE_VARIANT=gpu -t REGISTRY/topro:0.1.0-py311-gpu .
#
# RAY_VERSION must equal spec.rayVersion in the manifests (k8s/validate.py checks it).
ARG RAY_VERSION=2.60.0
ARG PYTHON_TAG=py311
# cpu, or gpu (CUDA) for the GPU worker group.
ARG RAY_IMAGE_VARIANT=cpu
FROM rayproject/ray:${RAY_VERSION}-${PYTHON_TAG}-${RAY_IMAGE_VARIANT}

ARG RAY_VERSION
ARG MLFLOW_VERSION=3.17.2

# The base image's user is "ray" (uid 1000, gid 100); the image never switches to root.
USER 1000:100
WORKDIR /home/ray/topro

# Dependencies first so that code edits reuse this (large) layer.
COPY --chown=1000:100 pyproject.toml README.md ./
COPY --chown=1000:100 platform/ platform/
# Ray stays at the base image's version; MLflow is pinned because client and
# server (the mlflow Deployment runs this image too) must agree. psycopg2 lets the
# tracking server use a PostgreSQL backend store (see k8s/README.md).
RUN pip install --no-cache-dir \
        "ray[tune,train,serve]==${RAY_VERSION}" \
        "mlflow==${MLFLOW_VERSION}" \
        "psycopg2-binary" \
        . \
    && python -c "import ray, mlflow, topro; assert ray.__version__ == '${RAY_VERSION}', ray.__version__"

COPY --chown=1000:100 jobs/ jobs/
COPY --chown=1000:100 serve/ serve/
COPY --chown=1000:100 configs/ configs/

# Job entrypoints (python jobs/sweep.py --config configs/...) and Serve import
# paths (serve.tagging:build_app) resolve against the project directory.
ENV PYTHONPATH=/home/ray/topro \
    PYTHONUNBUFFERED=1 \
    RAY_USAGE_STATS_ENABLED=0 \
    MLFLOW_DISABLE_TELEMETRY=true
