#!/usr/bin/env python3
"""Checks what a CUDA dry run left behind (scripts/cuda-dry-run.sh).

    check.py PTXAS DIR [DIR ...]

Each DIR holds the PTX modules the stand-in driver was given (module-PID-N.ptx) and its launch
log (launches.tsv: kernel, its module's PID-N, grid x/y/z, block x/y/z, dynamic shared bytes, ok or
OVER-LIMIT). Every module is compiled by ptxas for the H100 (sm_90a, as CubeCL asks NVRTC);
every launch is checked against what the compiled kernel needs: registers (rounded as the
hardware allocates them) times threads within the 65 536 of a block, static plus dynamic
shared memory within 227 KiB. Prints one line per kernel and exits 1 on any failure.
"""

import re
from collections import Counter
import subprocess
import sys
from pathlib import Path

REGS_PER_BLOCK = 65536
SHARED_OPTIN = 232448
STATIC_SHARED = 49152


def compile_module(ptxas, path):
    """{entry: (registers, static shared bytes, spill bytes)} or an error message."""
    run = subprocess.run(
        [ptxas, "-arch=sm_90a", "-v", "-o", "/dev/null", str(path)],
        capture_output=True,
        text=True,
    )
    if run.returncode != 0:
        return f"ptxas failed on {path.name}:\n{run.stderr.strip()}"
    entries, current = {}, None
    for line in run.stderr.splitlines():
        m = re.search(r"Compiling entry function '([^']+)'", line)
        if m:
            current = m.group(1)
            entries[current] = [0, 0, 0]
            continue
        if current is None:
            continue
        m = re.search(r"(\d+) bytes spill stores", line)
        if m:
            entries[current][2] = int(m.group(1))
        m = re.search(r"Used (\d+) registers", line)
        if m:
            entries[current][0] = int(m.group(1))
            s = re.search(r"(\d+) bytes smem", line)
            entries[current][1] = int(s.group(1)) if s else 0
    return {k: tuple(v) for k, v in entries.items()}


def main():
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    ptxas, dirs = sys.argv[1], [Path(d) for d in sys.argv[2:]]
    failures, kernels = Counter(), {}
    for d in dirs:
        compiled = {}
        for ptx in sorted(d.glob("module-*.ptx")):
            got = compile_module(ptxas, ptx)
            if isinstance(got, str):
                failures[got] += 1
                continue
            compiled[ptx.stem.removeprefix("module-")] = got
        log = d / "launches.tsv"
        for line in log.read_text().splitlines() if log.exists() else []:
            name, module, gx, gy, gz, bx, by, bz, dyn, verdict = line.split("\t")
            threads = int(bx) * int(by) * int(bz)
            regs, static, spill = compiled.get(module, {}).get(name, (None, 0, 0))
            k = kernels.setdefault(name, {"launches": 0, "threads": 0, "regs": 0, "shared": 0,
                                          "spill": 0, "modules": set()})
            k["launches"] += 1
            k["modules"].add((d, module))
            k["threads"] = max(k["threads"], threads)
            k["shared"] = max(k["shared"], static + int(dyn))
            k["spill"] = max(k["spill"], spill)
            if verdict != "ok":
                failures[f"{name}: over the H100's limits: grid {gx}×{gy}×{gz}, block {bx}×{by}×{bz}, "
                         f"{dyn} B dynamic shared"] += 1
            if regs is None:
                failures[f"{name}: launched from module {module} of {d}, not compiled"] += 1
                continue
            k["regs"] = max(k["regs"], regs)
            allocated = -(-max(regs, 1) // 8) * 8 * (-(-threads // 32) * 32)
            if allocated > REGS_PER_BLOCK:
                failures[f"{name}: {regs} registers × {threads} threads > {REGS_PER_BLOCK}"] += 1
            if static > STATIC_SHARED or static + int(dyn) > SHARED_OPTIN:
                failures[f"{name}: {static} + {dyn} bytes of shared memory"] += 1
    width = max((len(n) for n in kernels), default=6)
    print(f"{'kernel':<{width}}  launches   modules  max threads  registers  shared B  spills B")
    for name, k in sorted(kernels.items()):
        print(f"{name:<{width}}  {k['launches']:>8}  {len(k['modules']):>8}  {k['threads']:>11}"
              f"  {k['regs']:>9}  {k['shared']:>8}  {k['spill']:>8}")
    modules = sum(len(list(d.glob("module-*.ptx"))) for d in dirs)
    print(f"{modules} modules compiled by ptxas for sm_90a, {len(kernels)} kernels launched")
    for f, n in failures.items():
        print("FAILED:", f, f"(×{n})" if n > 1 else "")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
