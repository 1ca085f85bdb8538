#!/usr/bin/env python3
"""Clone mechanisms of QEMU 7.2 (TCG) measured side by side, outside form-vmm-service.

For each guest memory size, one primary boots (the project's guest: Debian's kernel and
the initramfs of deploy/guest/build.sh, the demo app in it) and is snapshotted and
cloned `--clones` times by each mechanism:

- stream: what the qemu backend does today. Anonymous guest RAM; the snapshot is a
  migration stream of the whole memory; a clone loads the stream before it runs.
- file: guest RAM in a file on tmpfs shared with QEMU (memory-backend-file,
  share=on); the snapshot migrates the device state only (capability x-ignore-shared)
  and copies the RAM file's data extents (SEEK_DATA/SEEK_HOLE); a clone maps that copy
  privately (share=off: copy-on-write, pages loaded on demand) and loads the device
  state only.

It prints, per mechanism and size: the snapshot's pause, the clone's phases (QEMU up,
incoming state, first HTTP 200 after `cont`, the second request), and the clones'
proportional memory (PSS) while they run side by side. Usage:

    deploy/guest/build.sh target/static/.../form-demo-app /tmp/guest
    bench/qemu-memory-file.py --guest-dir /tmp/guest [--sizes 256,1024] [--clones 3]

Results and the choice they led to: docs/vmm.md ("Clones whose cost does not grow
with memory").
"""

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
import urllib.request


class Qmp:
    """A QMP session over a Unix socket (greeting, capabilities, then commands)."""

    def __init__(self, path, deadline=30.0):
        end = time.time() + deadline
        while True:
            try:
                self.sock = socket.socket(socket.AF_UNIX)
                self.sock.connect(path)
                break
            except OSError:
                if time.time() > end:
                    raise
                time.sleep(0.005)
        self.f = self.sock.makefile("rw")
        self.f.readline()
        self.cmd("qmp_capabilities")

    def cmd(self, name, args=None):
        msg = {"execute": name}
        if args is not None:
            msg["arguments"] = args
        self.f.write(json.dumps(msg) + "\n")
        self.f.flush()
        while True:
            r = json.loads(self.f.readline())
            if "return" in r:
                return r["return"]
            if "error" in r:
                raise RuntimeError(f"{name}: {r['error']}")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def first_200(port, deadline=60.0):
    """Polls /healthz until it answers 200; the time it did."""
    end = time.time() + deadline
    while time.time() < end:
        try:
            url = f"http://127.0.0.1:{port}/healthz"
            if urllib.request.urlopen(url, timeout=0.5).status == 200:
                return time.time()
        except Exception:
            time.sleep(0.005)
    raise RuntimeError(f"nothing served on {port} within {deadline} s")


def pss_mib(pid):
    for line in open(f"/proc/{pid}/smaps_rollup"):
        if line.startswith("Pss:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class Run:
    def __init__(self, guest, mib, work, mechanism):
        self.guest, self.mib, self.work, self.mechanism = guest, mib, work, mechanism
        self.procs = []

    def args(self, name, port, ram):
        a = [
            "qemu-system-x86_64", "-M", "pc", "-accel", "tcg", "-cpu", "max",
            "-nographic", "-nodefaults", "-no-reboot",
            "-kernel", os.path.join(self.guest, "vmlinux"),
            "-initrd", os.path.join(self.guest, "initramfs.cpio.gz"),
            "-append", "console=ttyS0 quiet panic=-1 swiotlb=512 form.instance=bench form.port=8080",
            "-device", "virtio-net-pci,netdev=n0",
            "-smp", "1", "-m", f"{self.mib}M",
            "-qmp", f"unix:{self.work}/{name}.sock,server=on,wait=off",
            "-serial", f"file:{self.work}/{name}.console",
            "-netdev", f"user,id=n0,hostfwd=tcp:127.0.0.1:{port}-:8080",
        ]
        if ram is not None:
            path, share = ram
            a += [
                "-machine", "memory-backend=ram0",
                "-object",
                f"memory-backend-file,id=ram0,size={self.mib}M,mem-path={path},share={share}",
            ]
        return a

    def spawn(self, args):
        p = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.procs.append(p)
        return p

    def capability(self, q):
        if self.mechanism == "file":
            q.cmd("migrate-set-capabilities",
                  {"capabilities": [{"capability": "x-ignore-shared", "state": True}]})

    def primary(self):
        port = free_port()
        ram = (f"{self.shm}/primary.ram", "on") if self.mechanism == "file" else None
        self.spawn(self.args("primary", port, ram))
        q = Qmp(f"{self.work}/primary.sock")
        first_200(port, 180)
        return q

    def snapshot(self, q, n):
        d = f"{self.work}/snap{n}"
        os.makedirs(d)
        t0 = time.time()
        q.cmd("stop")
        self.capability(q)
        q.cmd("migrate-set-parameters", {"max-bandwidth": 64 << 30})
        q.cmd("migrate", {"uri": f"exec:cat > {d}/state.bin"})
        while q.cmd("query-migrate").get("status") != "completed":
            time.sleep(0.001)
        if self.mechanism == "file":
            copy_data(f"{self.shm}/primary.ram", f"{d}/memory.ram")
            os.chmod(f"{d}/memory.ram", 0o400)
        q.cmd("cont")
        return d, (time.time() - t0) * 1e3

    def clone(self, d, k):
        port = free_port()
        ram = (f"{d}/memory.ram", "off") if self.mechanism == "file" else None
        t0 = time.time()
        p = self.spawn(self.args(f"clone{k}", port, ram) + ["-incoming", "defer"])
        q = Qmp(f"{self.work}/clone{k}.sock")
        t1 = time.time()
        self.capability(q)
        q.cmd("migrate-incoming", {"uri": f"exec:cat {d}/state.bin"})
        while q.cmd("query-status")["status"] == "inmigrate":
            time.sleep(0.001)
        t2 = time.time()
        q.cmd("cont")
        t3 = first_200(port, 60)
        t4 = time.time()
        first_200(port, 60)
        t5 = time.time()
        return p, [(t1 - t0) * 1e3, (t2 - t1) * 1e3, (t3 - t2) * 1e3, (t3 - t0) * 1e3, (t5 - t4) * 1e3]

    def stop(self):
        for p in self.procs:
            p.kill()
            p.wait()


def copy_data(src, dst):
    """Copies the data extents of sparse file `src` to `dst` (holes stay holes)."""
    s = os.open(src, os.O_RDONLY)
    d = os.open(dst, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o600)
    try:
        size = os.fstat(s).st_size
        os.ftruncate(d, size)
        off = 0
        while off < size:
            try:
                data = os.lseek(s, off, os.SEEK_DATA)
            except OSError:
                break
            hole = os.lseek(s, data, os.SEEK_HOLE)
            os.lseek(d, data, os.SEEK_SET)
            while data < hole:
                data += os.sendfile(d, s, data, hole - data)
            off = hole
    finally:
        os.close(s)
        os.close(d)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--guest-dir", required=True)
    ap.add_argument("--sizes", default="256,1024", help="guest memory sizes, MiB")
    ap.add_argument("--clones", type=int, default=3)
    ap.add_argument("--shm", default="/dev/shm", help="tmpfs for the primary's RAM file")
    a = ap.parse_args()
    rows = []
    for mib in [int(s) for s in a.sizes.split(",")]:
        for mechanism in ["stream", "file"]:
            work = tempfile.mkdtemp(prefix=f"qmem-{mechanism}-{mib}-")
            shm = tempfile.mkdtemp(prefix="qmem-", dir=a.shm)
            r = Run(a.guest_dir, mib, work, mechanism)
            r.shm = shm
            try:
                q = r.primary()
                snaps = [r.snapshot(q, n) for n in range(a.clones)]
                phases, clones = [], []
                for k, (d, _) in enumerate(snaps):
                    p, ph = r.clone(d, k)
                    clones.append(p)
                    phases.append(ph)
                time.sleep(1)
                pss = [pss_mib(p.pid) for p in clones]
                med = [statistics.median(x) for x in zip(*phases)]
                snap = statistics.median(s for _, s in snaps)
                state = os.path.getsize(f"{snaps[0][0]}/state.bin") / 2**20
                rows.append((mib, mechanism, snap, state, *med, statistics.median(pss)))
            finally:
                r.stop()
                shutil.rmtree(work, ignore_errors=True)
                shutil.rmtree(shm, ignore_errors=True)
    print(f"QEMU (TCG), medians of {a.clones} snapshots and clones per row; ms unless named")
    print("| MiB | mechanism | snapshot pause | state stream MiB | QEMU up | incoming | "
          "first 200 after cont | clone to first 200 | second request | clone PSS MiB (% of RAM) |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for mib, m, snap, state, up, inc, after, total, second, pss in rows:
        print(f"| {mib} | {m} | {snap:.0f} | {state:.1f} | {up:.0f} | {inc:.0f} | {after:.0f} | "
              f"{total:.0f} | {second:.0f} | {pss:.0f} ({100 * pss / mib:.0f}%) |")


if __name__ == "__main__":
    main()
