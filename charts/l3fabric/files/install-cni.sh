#!/bin/sh
# install-cni: the agent DaemonSet's init container runs this on every node, before the agent.
#
# The container runtime runs the CNI plugin on the host, outside any container, so the plugin
# needs a Python on the host. The image keeps a relocatable one under /opt/l3fabric/python
# (see the Dockerfile); this script
#  1. copies the part of it the plugin uses (interpreter, libpython, standard library and the
#     `cni` package; not the other site-packages) to the same path on the host, into a
#     directory named after the image's bundle id, and switches the host's
#     /opt/l3fabric/python symlink to it with one rename: a plugin starting meanwhile runs the
#     old copy or the new one, never half of one. Copies other than the new and the previous
#     one are removed;
#  2. runs `l3fabric cni install`, which writes the plugin launcher (#! that interpreter) into
#     the host's CNI bin directory and 10-l3fabric.conflist into its config directory, each
#     written atomically.
# Running it again with the same image changes nothing but the two files of step 2.
set -eu

: "${L3FABRIC_PYTHON:=/opt/l3fabric/python}"       # the runtime inside the image
: "${HOST_INSTALL_DIR:=/host/opt/l3fabric}"        # the host's /opt/l3fabric, mounted here
: "${CNI_BIN_DIR:=/host/opt/cni/bin}"              # the host's CNI bin dir, mounted here
: "${CNI_CONF_DIR:=/host/etc/cni/net.d}"           # the host's CNI config dir, mounted here
: "${CNI_MTU:=}"                                  # empty: the agent's MTU applies
: "${AGENT_SOCKET:=/var/run/l3fabric/agent.sock}"  # as seen on the host
: "${L3FABRIC:=l3fabric}"                          # the CLI

log() { echo "install-cni: $*" >&2; }

id=$(cat "$L3FABRIC_PYTHON/.bundle-id")
case "$id" in
    ''|*[!0-9a-f]*) log "bad bundle id '$id' in $L3FABRIC_PYTHON/.bundle-id"; exit 1 ;;
esac
name="python-$id"
target="$HOST_INSTALL_DIR/$name"
mkdir -p "$HOST_INSTALL_DIR"

if [ ! -f "$target/.bundle-id" ]; then
    staging="$HOST_INSTALL_DIR/.staging-$id"
    rm -rf "$staging"
    mkdir -p "$staging/bin" "$staging/lib"
    cp -Pp "$L3FABRIC_PYTHON"/bin/python* "$staging/bin/"
    cp -Pp "$L3FABRIC_PYTHON"/lib/libpython* "$staging/lib/"
    # -p and tar keep the files' times, so the compiled .pyc files stay valid.
    for stdlib in "$L3FABRIC_PYTHON"/lib/python3*; do
        version=${stdlib##*/}
        mkdir -p "$staging/lib/$version/site-packages"
        tar -C "$stdlib" --exclude=./site-packages -cf - . | tar -C "$staging/lib/$version" -xf -
        if [ -d "$stdlib/site-packages/cni" ]; then
            cp -Rp "$stdlib/site-packages/cni" "$staging/lib/$version/site-packages/"
        fi
    done
    # The id goes in last: a copy without it is incomplete and is made again.
    cp "$L3FABRIC_PYTHON/.bundle-id" "$staging/.bundle-id"
    rm -rf "$target"
    mv "$staging" "$target"
    log "copied the plugin runtime to $target"
fi

link="$HOST_INSTALL_DIR/python"
previous=""
if [ -L "$link" ]; then
    previous=$(readlink "$link")
elif [ -e "$link" ]; then
    rm -rf "$link"  # not ours to keep: only this script writes there, always as a symlink
fi
ln -sfn "$name" "$HOST_INSTALL_DIR/.python.new"
mv -T "$HOST_INSTALL_DIR/.python.new" "$link"

for old in "$HOST_INSTALL_DIR"/python-*; do
    [ -e "$old" ] || continue
    base=${old##*/}
    if [ "$base" != "$name" ] && [ "$base" != "$previous" ]; then
        rm -rf "$old"
        log "removed the old plugin runtime $old"
    fi
done

# No CNI_MTU: the conflist names no MTU and the agent's (encapsulation-aware) one applies.
exec "$L3FABRIC" cni install \
    --bin-dir "$CNI_BIN_DIR" --conf-dir "$CNI_CONF_DIR" --socket "$AGENT_SOCKET" \
    ${CNI_MTU:+--mtu "$CNI_MTU"}
