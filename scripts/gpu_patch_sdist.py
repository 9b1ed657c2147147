#!/usr/bin/env python3
"""Prepare an unpacked mamba-ssm or causal-conv1d source tree for a fast one-architecture build.

Used by ``scripts/gpu_check.sh`` on a GPU machine, where the build is paid from a short device budget:

- ``--arch 90``: the ``cc_flag`` list of ``setup.py`` keeps only ``-gencode arch=compute_90,code=sm_90``
  (upstream lists sm_75 to sm_121, one ptxas pass each).
- ``--split``: each ``.cu`` file whose explicit instantiations (``template void name<...>(...);`` lines)
  are all in one translation unit is copied into parts holding a few instantiations each, and
  ``setup.py`` lists the parts instead. Every part has the whole file's templates, so the parts compile
  in parallel (``MAX_JOBS``). causal-conv1d 1.6 keeps its 18 backward instantiations in one file, which
  alone took 389 s on an H200 machine's 16 cores; mamba-ssm already splits its kernels by dtype.

    python3 scripts/gpu_patch_sdist.py SRC_DIR --arch 90 [--split csrc/causal_conv1d_bwd.cu:2 ...]

``FILE:N`` puts N instantiations in each part of FILE.
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

MARKER = "    # HACK: The compiler flag"  # the line after the cc_flag list, in both packages' setup.py


def restrict_arch(setup: str, arch: str) -> str:
    """``setup.py`` text whose ``cc_flag`` holds one ``-gencode`` for ``sm_<arch>``."""
    if MARKER not in setup:
        raise SystemExit(f"gpu_patch_sdist: setup.py has no line starting {MARKER.strip()!r}; "
                         "the cc_flag patch needs updating for this release")
    line = (f'    cc_flag = [f for f in cc_flag if f != "-gencode" and not f.startswith("arch=")] '
            f'+ ["-gencode", "arch=compute_{arch},code=sm_{arch}"]  # one arch only\n')
    return setup.replace(MARKER, line + MARKER, 1)


def split(root: Path, setup: str, rel: str, per_part: int) -> str:
    """Write ``rel``'s parts next to it; return ``setup.py`` text that lists them instead of ``rel``."""
    path = root / rel
    lines = path.read_text().splitlines(keepends=True)
    inst = [i for i, x in enumerate(lines) if re.match(r"\s*template\s+void\s+\w+\s*<.*>\s*\(.*\);", x)]
    if not inst:
        raise SystemExit(f"gpu_patch_sdist: {rel} has no explicit 'template void name<...>(...);' lines to split")
    body = [x for i, x in enumerate(lines) if i not in set(inst)]
    names = []
    for k in range(0, len(inst), per_part):
        part = path.with_name(f"{path.stem}_part{k // per_part}{path.suffix}")
        part.write_text("".join(body) + "".join(lines[i] for i in inst[k:k + per_part]))
        names.append(str(part.relative_to(root)))
    quoted = f'"{rel}",'
    if quoted not in setup:
        raise SystemExit(f"gpu_patch_sdist: setup.py does not list {quoted}")
    return setup.replace(quoted, " ".join(f'"{n}",' for n in names), 1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", type=Path, help="unpacked source distribution (holds setup.py)")
    p.add_argument("--arch", required=True, help="compute capability without the dot, e.g. 90")
    p.add_argument("--split", action="append", default=[], metavar="FILE:N")
    ns = p.parse_args()
    setup_path = ns.src / "setup.py"
    setup = restrict_arch(setup_path.read_text(), ns.arch)
    for item in ns.split:
        rel, _, n = item.rpartition(":")
        setup = split(ns.src, setup, rel, int(n))
    setup_path.write_text(setup)
    print(f"gpu_patch_sdist: {ns.src.name}: sm_{ns.arch} only"
          + "".join(f", {item.rpartition(':')[0]} split" for item in ns.split), file=sys.stderr)


if __name__ == "__main__":
    main()
