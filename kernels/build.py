#!/usr/bin/env python3
"""Build the CPU kernels: configure + build with CMake, copy the _ext module into semantic_kernels/.

`make setup` runs it with the venv's interpreter, which must have mlx and nanobind 3 installed: the
extension binds MLX's C++ classes, so it is built against the very mlx wheel installed (and again
after any upgrade: the build is stamped with the mlx version).

    .venv/bin/python kernels/build.py            # Release build into kernels/build/
    .venv/bin/python kernels/build.py --test     # also runs the C++ self-test (every path vs a reference)
    .venv/bin/python kernels/build.py --clean    # remove kernels/build/ first
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.abspath(__file__))
BUILD = os.path.join(ROOT, "build")
PKG = os.path.join(os.path.dirname(ROOT), "semantic_kernels")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clean", action="store_true")
    ap.add_argument("--test", action="store_true", help="run build/sk_selftest after building")
    ap.add_argument("--debug", action="store_true")
    args = ap.parse_args()
    if args.clean and os.path.isdir(BUILD):
        shutil.rmtree(BUILD)
    cfg = [
        "cmake",
        "-S",
        ROOT,
        "-B",
        BUILD,
        f"-DPython_EXECUTABLE={sys.executable}",
        f"-DCMAKE_BUILD_TYPE={'Debug' if args.debug else 'Release'}",
    ]
    subprocess.check_call(cfg)
    subprocess.check_call(["cmake", "--build", BUILD, "-j", str(os.cpu_count() or 2)])
    built = glob.glob(os.path.join(BUILD, "_ext*.so")) + glob.glob(os.path.join(BUILD, "_ext*.pyd"))
    if not built:
        print("build produced no _ext module", file=sys.stderr)
        return 1
    for old in glob.glob(os.path.join(PKG, "_ext*.so")):
        os.remove(old)
    for f in built:
        shutil.copy2(f, PKG)
        print("installed", os.path.relpath(os.path.join(PKG, os.path.basename(f)), os.path.dirname(ROOT)))
    # The extension binds MLX's C++ classes: record which mlx it was built against, so a later
    # upgrade is refused at import (semantic_kernels/__init__.py) instead of crashing.
    import mlx.core as mx

    with open(os.path.join(PKG, "_ext.mlx-version"), "w") as f:
        f.write(mx.__version__ + "\n")
    if args.test:
        subprocess.check_call([os.path.join(BUILD, "sk_selftest"), "--quick"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
