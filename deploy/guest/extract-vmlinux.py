"""Extracts the uncompressed vmlinux ELF from a bzImage (as the kernel's
scripts/extract-vmlinux does): finds a compressed payload and checks the result
starts with the ELF magic. usage: extract-vmlinux.py BZIMAGE OUT"""
import lzma
import sys
import zlib


def candidates(data):
    start = 0
    while True:
        i = data.find(b"\xfd7zXZ\x00", start)
        if i < 0:
            break
        yield "xz", i
        start = i + 1
    start = 0
    while True:
        i = data.find(b"\x1f\x8b\x08", start)
        if i < 0:
            break
        yield "gzip", i
        start = i + 1


def main():
    src, dst = sys.argv[1], sys.argv[2]
    data = open(src, "rb").read()
    for kind, off in candidates(data):
        try:
            if kind == "xz":
                out = lzma.LZMADecompressor().decompress(data[off:])
            else:
                out = zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(data[off:])
        except Exception:
            continue
        if out[:4] == b"\x7fELF":
            open(dst, "wb").write(out)
            return 0
    print(f"extract-vmlinux: no ELF payload in {src}", file=sys.stderr)
    return 1


sys.exit(main())
