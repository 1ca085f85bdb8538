#!/usr/bin/env bash
# Builds the platform's container image, form-platform:local, from the project's own
# binaries: no base image is pulled. The image is FROM scratch with a root filesystem
# made here: every service binary, formctl (health probes, keys) and form-demo-app,
# each with the dynamic loader and the libraries ldd lists, plus glibc's name-service
# modules so that service names resolve inside a container network.
#
# usage: deploy/docker/build.sh [debug|release]   (default release)
# needs: cargo, docker, ldd
set -euo pipefail
cd "$(dirname "$0")/../.."

profile=${1:-release}
case "$profile" in
    release) flag=(--release) ;;
    debug) flag=() ;;
    *) echo "build.sh: profile '$profile' is not accepted; expected debug or release" >&2; exit 2 ;;
esac
command -v docker >/dev/null || { echo "build.sh: docker is missing" >&2; exit 1; }

bins=(form-state form-rplb form-vmm-service form-scaler form-mcp formctl form-demo-app)
cargo build --locked "${flag[@]}" -p form-state -p form-rplb -p form-vmm-service \
    -p form-scaler -p form-mcp -p form-cli -p form-testkit --bins

ctx=target/docker
root="$ctx/rootfs"
rm -rf "$ctx"
mkdir -p "$root"/{usr/local/bin,etc,tmp}
chmod 1777 "$root/tmp"
# The directories the services write, owned by the unprivileged user they run as
# (uid 65532): a named volume mounted there for the first time takes this owner. The
# certificate directories are those of docker-compose.yml's holders.
owned="$ctx/owned"
mkdir -p "$owned"/{data,keys,tokens,cookie,v/state-1,v/state-2,v/state-3} \
    "$owned"/certs/{ca,formctl,state-1,state-2,state-3,vmm-1,vmm-2,rplb-1,rplb-2,scaler-1,scaler-2,mcp-1}

copy_lib() {
    local lib=$1
    mkdir -p "$root$(dirname "$lib")"
    cp -L "$lib" "$root$lib"
}
for b in "${bins[@]}"; do
    cp "target/$profile/$b" "$root/usr/local/bin/$b"
    for lib in $(ldd "target/$profile/$b" | grep -oE '/[^ ]+'); do
        copy_lib "$lib"
    done
done
# Name resolution (getaddrinfo loads these at run time): /etc/hosts, then DNS.
libdir=$(dirname "$(ldd "target/$profile/form-state" | grep -oE '/[^ ]+libc\.so\.6')")
for nss in libnss_files.so.2 libnss_dns.so.2 libresolv.so.2; do
    [ -e "$libdir/$nss" ] && copy_lib "$libdir/$nss"
done
printf 'hosts: files dns\n' > "$root/etc/nsswitch.conf"
printf 'root:x:0:0:root:/:/usr/local/bin/formctl\nform:x:65532:65532:form:/data:/usr/local/bin/formctl\nnobody:x:65534:65534:nobody:/:/usr/local/bin/formctl\n' > "$root/etc/passwd"
printf 'root:x:0:\nform:x:65532:\nnogroup:x:65534:\n' > "$root/etc/group"

cat > "$ctx/Dockerfile" <<'DOCKERFILE'
FROM scratch
COPY rootfs/ /
COPY --chown=65532:65532 owned/ /
ENV PATH=/usr/local/bin
WORKDIR /data
DOCKERFILE
docker build -q -t form-platform:local "$ctx"
echo "form-platform:local built from target/$profile"
