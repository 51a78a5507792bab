# The l3fabric image: one image, three commands (charts/l3fabric runs all of them):
#   l3fabric agent ...          the per-node agent (DaemonSet, root with a few capabilities)
#   install-cni.sh              puts the CNI plugin on the host (the agent's init container)
#   l3fabric ipam gc ...        the leaked-address collector (Deployment, non-root)
#
# Python lives under /opt/l3fabric/python, made relocatable, not in /usr/local: the container
# runtime runs the CNI plugin on the *host*, so install-cni copies the interpreter, its
# standard library and the `cni` package to the same path there, and the plugin launcher that
# `l3fabric cni install` writes (#!/opt/l3fabric/python/bin/python3 -IS) works on the host as
# it does here. The copy needs a host glibc at least as new as this image's (Debian 12: 2.36).
#
# Build: docker build -t l3fabric/l3fabric:0.1.0 .

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# --- build: a relocatable interpreter with the package and its dependencies ---------------------
FROM ${PYTHON_IMAGE} AS build

RUN apt-get update \
    && apt-get install -y --no-install-recommends patchelf \
    && rm -rf /var/lib/apt/lists/*

ENV PY=/opt/l3fabric/python
RUN set -eux; \
    version="$(python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])')"; \
    mkdir -p "$PY/bin" "$PY/lib"; \
    cp -a "/usr/local/bin/python$version" "$PY/bin/"; \
    ln -s "python$version" "$PY/bin/python3"; \
    ln -s python3 "$PY/bin/python"; \
    cp -a /usr/local/lib/libpython3*.so* "$PY/lib/"; \
    cp -a "/usr/local/lib/python$version" "$PY/lib/"; \
    cd "$PY/lib/python$version"; \
    rm -rf test idlelib tkinter turtledemo ensurepip lib2to3 pydoc_data config-* \
        lib-dynload/_tkinter*; \
    cd /; \
    # compiled once here: the CNI plugin starts on every pod sandbox and must not compile
    "/usr/local/bin/python$version" -m compileall -q -j0 --invalidation-mode unchecked-hash \
        "$PY/lib/python$version"; \
    # libpython next to the interpreter, found relative to it wherever the tree is copied
    patchelf --set-rpath '$ORIGIN/../lib' "$PY/bin/python$version"; \
    ldd "$PY/bin/python$version" | grep -q "$PY/lib/libpython"; \
    "$PY/bin/python3" -c "import sys; assert sys.prefix == '$PY', sys.prefix"

WORKDIR /src
COPY pyproject.toml README.md ./
COPY l3fabric ./l3fabric
COPY ipam_blocks ./ipam_blocks
COPY bgp_speaker ./bgp_speaker
COPY cni ./cni
RUN set -eux; \
    "$PY/bin/python3" -m pip install --no-cache-dir --root-user-action=ignore . ; \
    "$PY/bin/python3" -m pip uninstall -y --root-user-action=ignore pip setuptools wheel || true; \
    # what install-cni copies to the host must start with nothing but itself
    "$PY/bin/python3" -I -S -c "import sys; sys.path.insert(0, '$(echo $PY/lib/python3*/site-packages)'); import cni.shim"; \
    "$PY/bin/l3fabric" --help >/dev/null; \
    # the id of this runtime: install-cni names the host's copy after it
    cd "$PY"; \
    find . -type f -print0 | LC_ALL=C sort -z | xargs -0 sha256sum | sha256sum | cut -c1-16 \
        > .bundle-id

# --- runtime ---------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE}

COPY --from=build /opt/l3fabric/python /opt/l3fabric/python
# BIRD 2 reflects routes on route reflector nodes (the agent renders and supervises it).
RUN apt-get update \
    && apt-get install -y --no-install-recommends bird2 \
    && rm -rf /var/lib/apt/lists/*
# A fixed non-root user: what the IPAM GC runs as. The agent and install-cni run as root (they
# write host directories and program the node's network; see the chart), with only the
# capabilities they need.
RUN useradd --system --uid 10001 --user-group --no-create-home --shell /usr/sbin/nologin l3fabric
ENV PATH=/opt/l3fabric/python/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
USER 10001
ENTRYPOINT ["l3fabric"]
CMD ["--help"]
