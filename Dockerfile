# raytron's image for Ray clusters (cluster_configs/ray/kuberay_raycluster.yaml runs it): Ray's CUDA image
# with raytron and every dependency in pyproject.toml installed from a wheel built from this checkout.
#   docker build -t raytron:0.1.0 .
#   kind load docker-image raytron:0.1.0       # a local cluster; else tag and push to your registry:
#   docker tag raytron:0.1.0 REGISTRY/raytron:0.1.0 && docker push REGISTRY/raytron:0.1.0
# Jobs still carry the submitting client's raytron code (runtime_env.py_modules); the image provides the
# dependencies, which `raytron submit --address` checks on the cluster before it submits anything.

FROM rayproject/ray:2.60.0-py311-cu128 AS wheel
WORKDIR /home/ray/src
COPY --chown=ray:users pyproject.toml README.md ./
COPY --chown=ray:users raytron raytron
COPY --chown=ray:users launcher launcher
COPY --chown=ray:users parallelism parallelism
COPY --chown=ray:users models models
COPY --chown=ray:users data_pipeline data_pipeline
COPY --chown=ray:users ops ops
RUN python -m pip wheel --no-deps --wheel-dir /home/ray/dist .

FROM rayproject/ray:2.60.0-py311-cu128
COPY --from=wheel /home/ray/dist/ /tmp/raytron-dist/
# DeepSpeed ships as source: DS_BUILD_OPS=0 installs it without compiling its CUDA ops (built on first use).
RUN DS_BUILD_OPS=0 python -m pip install --no-cache-dir /tmp/raytron-dist/raytron-*.whl \
    && rm -rf /tmp/raytron-dist \
    && python -c "import raytron.launcher.cli, torch, deepspeed, megatron.core, ray.train"
