#!/usr/bin/env bash
# Builds the guest of the qemu backend from Debian's packages:
#   <out>/vmlinux (or vmlinuz)   Debian's kernel, uncompressed when possible (faster PVH boot)
#   <out>/initramfs.cpio.gz      busybox, the virtio network modules, the workload binary, /init
#
# usage: deploy/guest/build.sh WORKLOAD_BINARY OUT_DIR
#   WORKLOAD_BINARY  the workload (form-demo-app); a static build is copied as it is, a
#                    dynamically linked one with its loader and libraries (as ldd lists them)
#   OUT_DIR          where the kernel and initramfs go; downloads are cached in OUT_DIR/cache
# needs: apt-get (download only), dpkg-deb, busybox-static, cpio, gzip, xz, python3
set -euo pipefail

workload=${1:?usage: build.sh WORKLOAD_BINARY OUT_DIR}
out=${2:?usage: build.sh WORKLOAD_BINARY OUT_DIR}
here=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$out/cache"
out=$(cd "$out" && pwd)

for tool in dpkg-deb cpio gzip xz python3; do
    command -v "$tool" >/dev/null || { echo "build.sh: $tool is missing" >&2; exit 1; }
done
busybox=$(command -v busybox || true)
file_is_static() {
    local o
    o=$(ldd "$1" 2>&1 || true)
    grep -qE 'not a dynamic|statically linked' <<<"$o"
}
[ -n "$busybox" ] && file_is_static "$busybox" || { echo "build.sh: a static busybox is needed (apt-get install busybox-static)" >&2; exit 1; }

# The kernel package linux-image-amd64 points at.
pkg=$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
[ -n "$pkg" ] || { echo "build.sh: cannot resolve linux-image-amd64 (run apt-get update)" >&2; exit 1; }
deb=$(ls "$out/cache/${pkg}"_*.deb 2>/dev/null | head -1 || true)
if [ -z "$deb" ]; then
    echo "build.sh: downloading Debian's kernel package $pkg once (about 70 MB) into $out/cache" >&2
    (cd "$out/cache" && apt-get download "$pkg" >&2)
    deb=$(ls "$out/cache/${pkg}"_*.deb | head -1)
fi
kroot="$out/cache/kernel-$pkg"
[ -d "$kroot" ] || dpkg-deb -x "$deb" "$kroot"
vmlinuz=$(ls "$kroot"/boot/vmlinuz-* | head -1)
kver=${vmlinuz##*/vmlinuz-}

# An uncompressed vmlinux boots through PVH in about half the time of the bzImage.
rm -f "$out/vmlinux" "$out/vmlinuz"
if ! python3 "$here/extract-vmlinux.py" "$vmlinuz" "$out/vmlinux"; then
    cp "$vmlinuz" "$out/vmlinuz"
fi

root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
mkdir -p "$root"/{bin,sbin,proc,sys,dev,tmp,etc,lib/modules,app}
cp "$busybox" "$root/bin/busybox"
cp "$workload" "$root/app/workload"
if ! file_is_static "$workload"; then
    # Bring the dynamic loader and every library along, at the paths the binary expects.
    for lib in $(ldd "$workload" | grep -oE '/[^ ]+'); do
        mkdir -p "$root$(dirname "$lib")"
        cp -L "$lib" "$root$lib"
    done
fi
for m in virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci virtio_balloon failover net_failover virtio_net; do
    f=$(find "$kroot/lib/modules/$kver" -name "$m.ko*" | head -1)
    [ -n "$f" ] || { echo "build.sh: module $m not found in $pkg" >&2; exit 1; }
    case "$f" in
        *.xz) xz -dc "$f" > "$root/lib/modules/$m.ko" ;;
        *.zst) command -v zstd >/dev/null || { echo "build.sh: zstd is missing (apt-get install zstd)" >&2; exit 1; }
               zstd -dcq "$f" > "$root/lib/modules/$m.ko" ;;
        *) cp "$f" "$root/lib/modules/$m.ko" ;;
    esac
done
cp "$here/init" "$root/init"
chmod +x "$root/init" "$root/app/workload"
(cd "$root" && find . | cpio -o -H newc --quiet | gzip -1 > "$out/initramfs.cpio.gz")
echo "guest: $(ls "$out"/vmlinu? | head -1) $out/initramfs.cpio.gz (kernel $kver)"
