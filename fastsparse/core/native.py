"""Compiled CPU kernels of sparse execution: CSR @ dense (forward and input gradient) and the
sampled product (weight gradient), measured 2-3x faster than torch's MKL kernels on this
project's machines (``benchmarks/native_kernels.py``).

The C++ source (``_native.cpp``) is compiled on first use with the machine's C++ compiler
(``$CXX``, else ``c++``/``g++``/``clang++``) into ``~/.cache/fastsparse`` (``$FASTSPARSE_CACHE``)
and loaded with :mod:`ctypes`; the library's name carries a hash of the source, the compiler and
the flags, so a changed source is rebuilt and never confused with an old build. The file is built
without ``-march`` flags and picks AVX-512F, AVX2 + FMA or portable C++ at run time.

Nothing here is required: without a compiler (or with ``FASTSPARSE_NATIVE=0``) sparse execution
runs on torch's kernels, and :func:`status` says which kernels run and why. The library is only
loaded from a folder owned by the user and writable by no one else.

Threads: ``torch.get_num_threads()`` OpenMP threads, each on a range of rows holding about equal
nonzero counts. The library links libgomp, which torch's Linux wheels have already loaded, so
the kernels run on torch's own thread pool (threads of another pool compete with torch's, which
spin for a while after each parallel operation: measured 1.7x slower steps); a library that
brings an OpenMP runtime of its own is not used (:func:`status` says so). Each output element is summed by one
thread in a fixed order, so results do not depend on the number of threads.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import stat
import subprocess
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

import torch
from torch import Tensor

__all__ = ["available", "status", "spmm", "sddmm", "usable", "turned_off", "ISA_NAMES"]

ENV_SWITCH = "FASTSPARSE_NATIVE"        # "0": use torch's kernels
ENV_CACHE = "FASTSPARSE_CACHE"
ENV_ISA = "FASTSPARSE_NATIVE_ISA"       # "avx512" | "avx2" | "portable": at most this instruction set
ISA_NAMES = {2: "avx512", 1: "avx2", 0: "portable"}
FLAGS = ["-O3", "-std=c++17", "-shared", "-fPIC", "-fno-math-errno", "-fopenmp"]
_SOURCE = Path(__file__).with_name("_native.cpp")

_lock = threading.Lock()
_lib: Optional[ctypes.CDLL] = None
_isa = 0
_reason: Optional[str] = None            # why the kernels are not used (None: not tried yet / in use)
_tried = False
_off = 0                                 # > 0 inside turned_off()


def _compiler() -> Optional[str]:
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _private_dir(path: Path) -> Optional[str]:
    """None when ``path`` is a folder owned by this user that nobody else can write, else why not."""
    info = path.stat()
    if hasattr(os, "getuid") and info.st_uid != os.getuid():
        return f"{path} is owned by another user"
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"{path} is writable by other users"
    return None


def _build() -> Path:
    cxx = _compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler found (set CXX, or install g++ or clang++)")
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=60).stdout
    key = hashlib.sha256(_SOURCE.read_bytes() + version.encode() + " ".join(FLAGS).encode()
                         + platform.machine().encode()).hexdigest()[:16]
    folder = Path(os.environ.get(ENV_CACHE) or Path.home() / ".cache" / "fastsparse")
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    problem = _private_dir(folder)
    if problem:
        raise RuntimeError(f"will not load compiled code from a shared folder: {problem}")
    target = folder / f"native-{key}.so"
    if not target.exists():
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=folder)
        os.close(fd)
        try:
            done = subprocess.run([cxx, *FLAGS, str(_SOURCE), "-o", tmp], capture_output=True, text=True,
                                  timeout=300)
            if done.returncode != 0:
                lines = (done.stderr or done.stdout).strip().splitlines() or ["no message"]
                first = next((line for line in lines if "error" in line), lines[-1])
                raise RuntimeError(f"{Path(cxx).name} failed: {first.strip()[:300]}")
            os.replace(tmp, target)   # atomic: a concurrent process sees the old state or the whole file
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return target


def _openmp_runtimes() -> set[str]:
    """The OpenMP runtime files mapped into this process (Linux; empty elsewhere)."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return set()
    names = {"libgomp", "libomp", "libiomp5"}
    return {line.split()[-1] for line in maps.splitlines()
            if line.split() and any(Path(line.split()[-1]).name.startswith(n) for n in names)}


def _load() -> None:
    global _lib, _isa, _reason, _tried
    with _lock:
        if _tried:
            return
        _tried = True
        if os.environ.get(ENV_SWITCH, "1").strip().lower() in ("0", "false", "no", "off"):
            _reason = f"turned off by {ENV_SWITCH}={os.environ[ENV_SWITCH]}"
            return
        before = _openmp_runtimes()
        try:
            lib = ctypes.CDLL(str(_build()))
        except (OSError, RuntimeError, subprocess.SubprocessError) as err:
            _reason = f"not compiled: {err}"
            return
        ptr, i64, c_int = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
        for name in ("fs_spmm_i32", "fs_spmm_i64"):
            getattr(lib, name).argtypes = [ptr] * 7 + [i64, i64, i64, c_int, c_int]
            getattr(lib, name).restype = None
        for name in ("fs_sddmm_i32", "fs_sddmm_i64"):
            getattr(lib, name).argtypes = [ptr] * 5 + [i64, i64, i64, c_int, c_int]
            getattr(lib, name).restype = None
        added = _openmp_runtimes() - before
        if added and before:
            _reason = f"the compiled library brought another OpenMP runtime ({', '.join(sorted(added))})"
            return
        lib.fs_isa.restype = c_int
        isa = lib.fs_isa()
        cap = os.environ.get(ENV_ISA)
        if cap:
            by_name = {v: k for k, v in ISA_NAMES.items()}
            if cap not in by_name:
                _reason = f"{ENV_ISA}={cap!r} is not one of {sorted(by_name)}"
                return
            isa = min(isa, by_name[cap])
        _lib, _isa = lib, isa


def available() -> bool:
    """Whether the compiled kernels run here (compiles them on the first call)."""
    if not _tried:
        _load()
    return _lib is not None


def status() -> str:
    """Which kernels sparse execution uses on CPU, and why: ``native (avx512)`` or
    ``torch (MKL): <reason>``."""
    if available():
        return f"native ({ISA_NAMES[_isa]})"
    return f"torch (MKL): {_reason}"


@contextmanager
def turned_off() -> Iterator[None]:
    """Within this block sparse execution runs on torch's kernels (to compare the two)."""
    global _off
    _off += 1
    try:
        yield
    finally:
        _off -= 1


def usable(*tensors: Optional[Tensor]) -> bool:
    """The compiled kernels take contiguous float32 CPU tensors (and int32/int64 indices)."""
    if _off:
        return False
    for t in tensors:
        if t is None:
            continue
        if t.device.type != "cpu" or not t.is_contiguous() or t.dtype not in (torch.float32, torch.int32, torch.int64):
            return False
    return available()


def _require() -> None:
    if not available():
        raise RuntimeError(f"the compiled kernels are not available: {status()}")


def _same_index_dtype(*indices: Optional[Tensor]) -> None:
    """The kernels read every index tensor as crow's type: a mixed set would be read out of bounds."""
    dtypes = {t.dtype for t in indices if t is not None}
    if len(dtypes) != 1 or not dtypes <= {torch.int32, torch.int64}:
        raise ValueError(f"the index tensors must all be int32 or all int64, not {sorted(map(str, dtypes))}")


def _ptr(t: Optional[Tensor]) -> Optional[int]:
    return None if t is None else t.data_ptr()


def spmm(crow: Tensor, col: Tensor, values: Tensor, B: Tensor, bias: Optional[Tensor] = None,
         perm: Optional[Tensor] = None, out: Optional[Tensor] = None) -> Tensor:
    """``bias 1^T + A @ B`` for the CSR matrix ``A`` = (crow, col, values[perm] or values) of
    ``crow.numel() - 1`` rows and a contiguous (K, N) ``B``: a contiguous (rows, N) tensor, new or
    ``out`` (a reused buffer spares the first touch of its pages; its content is ignored). The
    caller checks :func:`usable` first."""
    _require()
    _same_index_dtype(crow, col, perm)
    rows, n = crow.numel() - 1, B.shape[1]
    if out is None:
        out = torch.empty(rows, n, dtype=torch.float32)
    elif out.shape != (rows, n) or out.dtype != torch.float32 or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous float32 ({rows}, {n}) tensor, not {out.dtype} {tuple(out.shape)}")
    if rows == 0 or n == 0:
        return out
    fn = _lib.fs_spmm_i32 if crow.dtype == torch.int32 else _lib.fs_spmm_i64
    fn(_ptr(crow), _ptr(col), _ptr(values), _ptr(perm), _ptr(B), _ptr(bias), _ptr(out), rows, B.shape[0], n,
       torch.get_num_threads(), _isa)
    return out


def sddmm(crow: Tensor, col: Tensor, G: Tensor, X: Tensor) -> Tensor:
    """``(G @ X^T)`` at the positions of the CSR pattern (crow, col), in its order: for a
    contiguous (rows, N) ``G`` and (K, N) ``X``, a new (nnz,) tensor. The caller checks
    :func:`usable` first."""
    _require()
    _same_index_dtype(crow, col)
    nnz, n = col.numel(), G.shape[1]
    if nnz == 0 or n == 0:
        return torch.zeros(nnz, dtype=torch.float32)
    out = torch.empty(nnz, dtype=torch.float32)
    fn = _lib.fs_sddmm_i32 if crow.dtype == torch.int32 else _lib.fs_sddmm_i64
    fn(_ptr(crow), _ptr(col), _ptr(G), _ptr(X), _ptr(out), crow.numel() - 1, X.shape[0], n,
       torch.get_num_threads(), _isa)
    return out


def _reset_for_tests() -> None:
    """Forget the loaded library so that the next call reads the environment again."""
    global _lib, _isa, _reason, _tried
    with _lock:
        _lib, _isa, _reason, _tried = None, 0, None, False
