"""Choosing the BLAS that MLX's CPU backend uses, before MLX is imported.

The Linux `mlx-cpu` wheel links the reference BLAS (about 4 GFLOP/s for sgemm here). MLX resolves
`cblas_sgemm` through the global symbol scope, so a library loaded with RTLD_GLOBAL before `import mlx`
takes its place. Candidates, measured on a 2-core x86-64 machine (`benchmarks/blas_choice.py`):

- OpenBLAS 0.3.3x from the `scipy-openblas32` wheel: ~180 GFLOP/s on prefill-shaped matmuls. Its
  symbols are prefixed (`scipy_cblas_sgemm`), so a four-line C shim (`cblas_shim.c`), compiled once
  with the system C compiler into the user cache, gives it the standard name. This is the default.
- MKL from the `mkl` wheel (x86-64 only, ~700 MB installed): ~110 GFLOP/s; used when present and
  OpenBLAS is not usable (no C compiler).
- The reference BLAS: what remains, with one warning line.

On macOS MLX uses Accelerate and Metal; nothing is done there.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from semantic_core.config import cache_root, early_blas_choice

log = logging.getLogger("semantic.blas")

_SHIM_SOURCE = Path(__file__).with_name("cblas_shim.c")


@dataclass(frozen=True)
class BlasInfo:
    name: str  # "openblas", "mkl", "reference", "accelerate", "unchanged"
    detail: str
    path: str | None = None

    def __str__(self) -> str:
        return f"{self.name} ({self.detail})" if self.detail else self.name


_INFO: BlasInfo | None = None
_SET_THREADS: Any = None  # the BLAS's own set-threads function, when it has one
_THREADS: int | None = None


def blas_info() -> BlasInfo:
    return _INFO if _INFO is not None else BlasInfo("unchanged", "setup_blas() was not called")


def setup_blas(choice: str | None = None) -> BlasInfo:
    """Load the chosen BLAS into the global symbol scope. Idempotent; call before `import mlx`."""
    global _INFO
    if _INFO is not None:
        return _INFO
    choice = choice or early_blas_choice()
    if sys.platform == "darwin":
        _INFO = BlasInfo("accelerate", "macOS: MLX uses Accelerate and Metal")
        return _INFO
    if "mlx.core" in sys.modules:
        _INFO = BlasInfo("unchanged", "mlx was imported before semantic_core; its BLAS is unknown")
        log.warning("mlx was imported before semantic_core: the CPU BLAS could not be chosen")
        return _INFO
    if choice == "reference":
        _INFO = BlasInfo("reference", "chosen by SEMANTIC_MLX_BLAS=reference")
        return _INFO

    errors: list[str] = []
    loaders = {"openblas": _load_openblas, "mkl": _load_mkl}
    order = [choice] if choice in loaders else ["openblas", "mkl"]
    for name in order:
        try:
            _INFO = loaders[name]()
            return _INFO
        except _Unavailable as exc:
            errors.append(f"{name}: {exc}")
    reason = "; ".join(errors)
    _INFO = BlasInfo("reference", f"slow; {reason}")
    # One line, as promised in the README: the model still runs, only slower.
    print(
        f"warning: using MLX's reference BLAS (about 30x slower prefill on CPU): {reason}",
        file=sys.stderr,
    )
    return _INFO


class _Unavailable(Exception):
    pass


def _load_openblas() -> BlasInfo:
    try:
        import scipy_openblas32
    except ImportError as exc:
        raise _Unavailable("the scipy-openblas32 package is not installed") from exc
    lib_dir = Path(scipy_openblas32.get_lib_dir())
    candidates = sorted(lib_dir.glob(f"lib{scipy_openblas32.get_library()}*.so*"))
    if not candidates:
        raise _Unavailable(f"no OpenBLAS library in {lib_dir}")
    lib = candidates[0]
    shim = _compiled_shim(lib)
    handle = ctypes.CDLL(str(lib), mode=ctypes.RTLD_GLOBAL)
    ctypes.CDLL(str(shim), mode=ctypes.RTLD_GLOBAL)
    _remember_thread_control(handle, "scipy_openblas_set_num_threads")
    version = getattr(scipy_openblas32, "__version__", "?")
    return BlasInfo("openblas", f"OpenBLAS {version} from scipy-openblas32", str(lib))


def _compiled_shim(lib: Path) -> Path:
    """The shim for this OpenBLAS, compiled once into the user cache (atomically, so racing
    processes are safe)."""
    source = _SHIM_SOURCE.read_bytes()
    key = hashlib.sha256(source + str(lib).encode() + str(lib.stat().st_mtime_ns).encode()).hexdigest()[:16]
    out_dir = cache_root() / "runtime"
    target = out_dir / f"cblas-shim-{key}.so"
    if target.exists():
        return target
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if compiler is None:
        raise _Unavailable("no C compiler (cc) to build the 4-line CBLAS shim; install gcc or clang")
    out_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".shim-", suffix=".so", dir=out_dir)
    os.close(fd)
    cmd = [compiler, "-O2", "-shared", "-fPIC", str(_SHIM_SOURCE), "-o", tmp]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if proc.returncode != 0:
            raise _Unavailable(f"compiling the CBLAS shim failed: {proc.stderr.strip()[:200]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def _load_mkl() -> BlasInfo:
    roots = {Path(sys.prefix) / "lib", Path(sys.base_prefix) / "lib"}
    for root in roots:
        for lib in sorted(root.glob("libmkl_rt.so*")):
            handle = ctypes.CDLL(str(lib), mode=ctypes.RTLD_GLOBAL)
            _remember_thread_control(handle, "MKL_Set_Num_Threads")
            return BlasInfo("mkl", "Intel MKL from the mkl package", str(lib))
    raise _Unavailable("the mkl package is not installed")


def _remember_thread_control(handle: Any, name: str) -> None:
    global _SET_THREADS
    fn = getattr(handle, name, None)
    if fn is not None:
        fn.argtypes = [ctypes.c_int]
        fn.restype = None
        _SET_THREADS = fn


def set_blas_threads(n: int) -> None:
    """Threads the BLAS may use for the next calls (no-op without an optimized BLAS, or when the
    user pinned OPENBLAS_NUM_THREADS / MKL_NUM_THREADS). Cheap: the engine switches it per phase."""
    global _THREADS
    if _SET_THREADS is None or n == _THREADS or n < 1:
        return
    if os.environ.get("OPENBLAS_NUM_THREADS") or os.environ.get("MKL_NUM_THREADS"):
        return
    _SET_THREADS(n)
    _THREADS = n
