#!/usr/bin/env python3
"""Writes kernels/tests/fixtures/quant.json: random ggml blocks of every type Arbor decodes and
their dequantization by the `gguf` Python package (pip install gguf==0.19.0 numpy).

Scale fields are set to finite f16 values so that every block is a valid one; all other bytes
are random."""
import json
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize

OUT = Path(__file__).resolve().parent.parent / "kernels" / "tests" / "fixtures" / "quant.json"
# type -> (block bytes, byte offsets of f16 scale fields)
LAYOUT = {
    T.F16: (2, [0]), T.BF16: (2, []), T.Q4_0: (18, [0]), T.Q4_1: (20, [0, 2]), T.Q5_0: (22, [0]),
    T.Q5_1: (24, [0, 2]), T.Q8_0: (34, [0]), T.Q4_K: (144, [0, 2]), T.Q5_K: (176, [0, 2]),
    T.Q6_K: (210, [208]),
}
BLOCK = {T.F16: 1, T.BF16: 1, T.Q4_K: 256, T.Q5_K: 256, T.Q6_K: 256}


def main():
    rng = np.random.default_rng(2026)
    cases = []
    for ty, (nbytes, scales) in LAYOUT.items():
        n_blocks = {256: 12, 32: 48}.get(BLOCK.get(ty, 32), 256)
        raw = rng.integers(0, 256, size=(n_blocks, nbytes), dtype=np.uint8)
        for off in scales:
            vals = rng.uniform(-0.05, 0.05, size=n_blocks).astype(np.float16)
            raw[:, off:off + 2] = vals.view(np.uint8).reshape(n_blocks, 2)
        if ty == T.BF16:
            vals = rng.normal(size=n_blocks).astype(np.float32).view(np.uint32) >> 16
            raw = vals.astype(np.uint16).view(np.uint8).reshape(n_blocks, 2)
        if ty == T.F16:
            raw = rng.normal(size=n_blocks).astype(np.float16).view(np.uint8).reshape(n_blocks, 2)
        values = dequantize(raw.reshape(-1), ty).astype(np.float32).reshape(-1)
        cases.append({"type": ty.name, "type_id": int(ty), "bytes": raw.reshape(-1).tobytes().hex(),
                      "values": [float(v) for v in values]})
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps({"generator": "gguf.quants.dequantize", "cases": cases}))
    print(OUT, sum(len(c["values"]) for c in cases), "values")


if __name__ == "__main__":
    main()
