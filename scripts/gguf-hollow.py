#!/usr/bin/env python3
"""A GGUF model without its weights, and weights put back as random valid blocks.

The device machines that run Arbor's GPU checks take at most 64 MiB of files per call, so a
1 GB model cannot travel there. Its timing does not depend on the weights' values, only on their
shapes and block formats, so:

    # here: keep the header (metadata, tokenizer, tensor table): a few MB
    python3 scripts/gguf-hollow.py hollow MODEL.gguf model.hollow
    # there: the same file with every tensor's bytes random but valid (finite f16 scales)
    python3 scripts/gguf-hollow.py fill model.hollow model.gguf [--seed 1]

`fill` writes norm gains 1, biases 0, float weights of random sign and magnitude in
[1/32, 1/16), and every block-quantized tensor's blocks as random codes under f16 scales chosen
so that a weight stays within about ±0.05: logits stay finite through any depth. Python's
standard library only (it runs where nothing can be installed); deterministic for a seed.
"""
import argparse
import random
import struct
import sys
from math import prod

# ggml type id -> (name, values per block, bytes per block, [(f16 field offset, value)])
# The f16 fields are the blocks' scales (and minimums); see ggml's block layouts.
TARGET = 0.05  # the largest |weight| a block can decode to, about
TYPES = {
    0: ("F32", 1, 4, []),
    1: ("F16", 1, 2, []),
    30: ("BF16", 1, 2, []),
    2: ("Q4_0", 32, 18, [(0, TARGET / 8)]),
    3: ("Q4_1", 32, 20, [(0, TARGET / 15), (2, -TARGET / 2)]),
    6: ("Q5_0", 32, 22, [(0, TARGET / 16)]),
    7: ("Q5_1", 32, 24, [(0, TARGET / 31), (2, -TARGET / 2)]),
    8: ("Q8_0", 32, 34, [(0, TARGET / 128)]),
    12: ("Q4_K", 256, 144, [(0, TARGET / (63 * 15)), (2, TARGET / (2 * 63))]),
    13: ("Q5_K", 256, 176, [(0, TARGET / (63 * 31)), (2, TARGET / (2 * 63))]),
    14: ("Q6_K", 256, 210, [(208, TARGET / (128 * 32))]),
}

# metadata value type id -> struct format of a scalar (8 = string, 9 = array)
SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}


class Reader:
    def __init__(self, data):
        self.data, self.pos = data, 0

    def take(self, fmt):
        (v,) = struct.unpack_from("<" + fmt, self.data, self.pos)
        self.pos += struct.calcsize("<" + fmt)
        return v

    def string(self):
        n = self.take("Q")
        s = bytes(self.data[self.pos : self.pos + n])
        if len(s) != n:
            raise ValueError("file ends inside a string")
        self.pos += n
        return s.decode("utf-8", "replace")

    def value(self, ty):
        if ty in SCALARS:
            return self.take(SCALARS[ty])
        if ty == 8:
            return self.string()
        if ty == 9:
            inner, n = self.take("I"), self.take("Q")
            if inner in SCALARS:  # skip numeric arrays without decoding each item
                size = struct.calcsize("<" + SCALARS[inner])
                self.pos += n * size
                return None
            return [self.value(inner) for _ in range(n)]
        raise ValueError(f"unknown metadata value type {ty}")


def parse(data):
    """(data section start, [(name, dims, type id, offset)]) of a GGUF file's prefix."""
    r = Reader(data)
    if bytes(data[:4]) != b"GGUF":
        raise ValueError("not a GGUF file (bad magic)")
    r.pos = 4
    version = r.take("I")
    if version not in (2, 3):
        raise ValueError(f"GGUF version {version} (2 or 3 supported)")
    n_tensors, n_kv = r.take("Q"), r.take("Q")
    alignment = 32
    for _ in range(n_kv):
        key = r.string()
        value = r.value(r.take("I"))
        if key == "general.alignment":
            alignment = int(value)
    tensors = []
    for _ in range(n_tensors):
        name = r.string()
        dims = [r.take("Q") for _ in range(r.take("I"))]
        ty, offset = r.take("I"), r.take("Q")
        if ty not in TYPES:
            raise ValueError(f"tensor {name}: ggml type {ty} has no filler here")
        tensors.append((name, dims, ty, offset))
    start = -(-r.pos // alignment) * alignment
    return start, tensors


def nbytes(dims, ty):
    _, per_block, size, _ = TYPES[ty]
    n = prod(dims)
    if n % per_block:
        raise ValueError(f"{n} values do not fill blocks of {per_block}")
    return n // per_block * size


def hollow(src, dst):
    with open(src, "rb") as f:
        head = f.read(64 << 20)  # metadata and tensor table are far smaller than this
    start, tensors = parse(head)
    with open(dst, "wb") as f:
        f.write(head[:start])
    total = max(off + nbytes(d, t) for _, d, t, off in tensors)
    print(f"{dst}: {start} bytes of header, {len(tensors)} tensors, {total} bytes of weights left out")


# Random float bytes made into values of random sign and magnitude in [1/32, 1/16) by
# rewriting each value's top byte (sign, exponent, and for f16 two mantissa bits) and, for
# f32/bf16, the exponent's last bit in the byte below it: (top-byte table, next-byte table).
FLOAT_EXPONENT = {
    "F32": (bytes((b & 0x80) | 0x3D for b in range(256)), bytes(b & 0x7F for b in range(256))),
    "BF16": (bytes((b & 0x80) | 0x3D for b in range(256)), bytes(b & 0x7F for b in range(256))),
    "F16": (bytes((b & 0x83) | 0x28 for b in range(256)), None),
}
ONE = {"F32": struct.pack("<f", 1.0), "F16": struct.pack("<e", 1.0), "BF16": struct.pack("<f", 1.0)[2:]}


def block_bytes(name, dims, ty, rng):
    label, per_block, size, scales = TYPES[ty]
    n = prod(dims)
    if label in FLOAT_EXPONENT:
        if "norm" in name:
            return ONE[label] * n
        if "bias" in name:
            return bytes(n * size)
        buf = bytearray(rng.randbytes(n * size))
        top, below = FLOAT_EXPONENT[label]
        buf[size - 1 :: size] = buf[size - 1 :: size].translate(top)
        if below is not None:
            buf[size - 2 :: size] = buf[size - 2 :: size].translate(below)
        return bytes(buf)
    buf = bytearray(rng.randbytes(n // per_block * size))
    for off, value in scales:
        for i, byte in enumerate(struct.pack("<e", value)):
            buf[off + i :: size] = bytes([byte]) * (n // per_block)
    return bytes(buf)


def fill(src, dst, seed):
    with open(src, "rb") as f:
        head = f.read()
    start, tensors = parse(head)
    rng = random.Random(seed)
    with open(dst, "wb") as f:
        f.write(head[:start])
        pos = 0
        for name, dims, ty, off in sorted(tensors, key=lambda t: t[3]):
            if off < pos:
                raise ValueError(f"tensor {name} overlaps the one before it")
            f.write(b"\0" * (off - pos))
            data = block_bytes(name, dims, ty, rng)
            f.write(data)
            pos = off + len(data)
    print(f"{dst}: {len(tensors)} tensors of random valid blocks, {start + pos} bytes")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    h = sub.add_parser("hollow", help="keep a GGUF file's header and tensor table only")
    h.add_argument("src")
    h.add_argument("dst")
    fl = sub.add_parser("fill", help="a hollow file with random valid weights")
    fl.add_argument("src")
    fl.add_argument("dst")
    fl.add_argument("--seed", type=int, default=1)
    a = ap.parse_args()
    try:
        hollow(a.src, a.dst) if a.cmd == "hollow" else fill(a.src, a.dst, a.seed)
    except (OSError, ValueError, struct.error) as e:
        sys.exit(f"gguf-hollow: {e}")


if __name__ == "__main__":
    main()
