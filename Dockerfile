# nextserve on a Ray base image: one image for the Ray head, the head replicas and the expert workers
# (KubeRay starts `ray start` in it; Serve imports nextserve.cluster.app:build_app from the installed package).
#
#   CPU (k8s/overlays/dev):  docker build -t nextserve:dev .
#   GPU (k8s/overlays/gpu):  docker build --build-arg RAY_FLAVOR=gpu \
#                              --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 \
#                              -t registry.example.com/nextserve:0.1.0-gpu .
#
# RAY_VERSION must equal the RayService's rayVersion (tests/process/test_k8s_image.py checks it).
ARG RAY_VERSION=2.60.0
ARG RAY_FLAVOR=cpu
FROM rayproject/ray:${RAY_VERSION}-py311-${RAY_FLAVOR}

ARG RAY_VERSION
# torch first, from the index that matches the flavor: a bare `torch` requirement from PyPI would pull
# a multi-GB CUDA build into the CPU image.
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

WORKDIR /home/ray/nextserve
RUN pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"

COPY --chown=ray:users pyproject.toml README.md __init__.py ./
COPY --chown=ray:users model/ model/
COPY --chown=ray:users router/ router/
COPY --chown=ray:users experts/ experts/
COPY --chown=ray:users proto/ proto/
COPY --chown=ray:users cluster/ cluster/
COPY --chown=ray:users bench/ bench/
# A plain install: everything is under the one package `nextserve` (the repository root, see pyproject.toml),
# so nothing collides with proto-plus's top-level `proto`, which Ray's dependencies install.
# Keep the base image's Ray: the cluster's Ray and the package's must be the same version.
RUN pip install --no-cache-dir . "ray[serve]==${RAY_VERSION}" "torch==${TORCH_VERSION}" \
 && python -c "import nextserve.cluster.app, ray; assert ray.__version__ == '${RAY_VERSION}', ray.__version__"
# A numeric, non-root user (the base image's ray, uid 1000, group users = 100): Kubernetes checks
# runAsNonRoot against the image's USER only when it is numeric (the pods also set runAsUser: 1000).
USER 1000:100
