"""Keep freed host memory in the process, so XLA:CPU's large buffers stop page-faulting on every call.

Why: on Linux with glibc, ``malloc`` serves every block above 32 MiB (and every large block
allocated from a worker thread's arena) with a fresh ``mmap`` and gives it back to the kernel
with ``munmap`` when it is freed.  XLA:CPU allocates each call's outputs and temporaries anew, so
a jitted function whose buffers are large touches brand-new pages on *every* call, and the kernel
zero-fills them one 4 KiB page fault at a time.  For memory-bound work that is most of the cost:
``boft.rotate`` on ``(4096, 4096)`` float32 activations (two 64 MiB buffers, 33k page faults per
call) takes about twice as long as the same computation on reused memory (BENCHMARKS.md, issue 2).
A compute-bound dense matmul barely notices.

:func:`keep_freed_memory` sets glibc's allocator (``mallopt``) so that freed memory stays in the
process and is reused: one arena for all threads, no ``mmap`` for large blocks, no trimming of the
heap.  The shell equivalent, for any Python process, is::

    MALLOC_ARENA_MAX=1 MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=2147483647 python ...

Costs: the process keeps its peak host memory until it exits (it never hands freed memory back),
and all threads share one arena lock (harmless for XLA, which allocates few, large buffers).
``train/finetune.py`` applies it on CPU-only machines (``--system-malloc`` opts out).

Example::

    import boft_jax as boft
    boft.keep_freed_memory()      # first, before any JAX computation
    import jax.numpy as jnp
    ...
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import importlib.util
import os
import platform
import sys

__all__ = ["MALLOC_ENV", "keep_freed_memory", "accelerator_plugins"]

# glibc <malloc.h> parameter numbers for mallopt()
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
_INT_MAX = 2**31 - 1

MALLOC_ENV: dict[str, str] = {
    "MALLOC_ARENA_MAX": "1",
    "MALLOC_MMAP_MAX_": "0",
    "MALLOC_TRIM_THRESHOLD_": str(_INT_MAX),
}
"""The same settings as environment variables (read by glibc when a process starts)."""

_applied = False


def accelerator_plugins() -> list[str]:
    """Installed JAX accelerator plugins (``jax_plugins`` entry points, ``libtpu``), by name.

    Empty on a CPU-only installation; ``JAX_PLATFORMS=cpu`` (environment) also counts as CPU-only.
    """
    platforms = os.environ.get("JAX_PLATFORMS", "")
    if platforms and all(p.strip() == "cpu" for p in platforms.split(",")):
        return []
    found = sorted({ep.name for ep in importlib.metadata.entry_points(group="jax_plugins")})
    if importlib.util.find_spec("libtpu") is not None:
        found.append("libtpu")
    return found


def _backends_initialized() -> bool:
    if "jax" not in sys.modules:
        return False
    try:
        from jax._src import xla_bridge
    except ImportError:  # pragma: no cover - a JAX without this private module: cannot tell
        return False
    check = getattr(xla_bridge, "backends_are_initialized", None)
    return bool(check()) if check is not None else False


def keep_freed_memory(*, cpu_only: bool = True) -> bool:
    """Make glibc keep freed memory for reuse (see the module docstring); call it before JAX runs.

    Args:
      cpu_only: do nothing when an accelerator plugin is installed (:func:`accelerator_plugins`):
        there XLA's large buffers live on the device, and the host does not need the setting.

    Returns:
      ``True`` when the settings are in effect (applied now or by an earlier call), ``False`` when
      nothing was done: not Linux with glibc (other allocators keep freed memory anyway; nothing to
      fix), or ``cpu_only`` and an accelerator plugin is installed.

    Raises:
      RuntimeError: JAX has already run a computation (its backend and worker threads exist, and
        the threads keep the arenas they already use, so the setting would not reach XLA's
        buffers).  Call it first thing, or set :data:`MALLOC_ENV` in the environment instead.
      OSError: glibc refused one of the settings (names it).

    Example:
      >>> import boft_jax as boft
      >>> boft.keep_freed_memory() in (True, False)  # doctest: +SKIP
      True
    """
    global _applied
    if _applied:
        return True
    if sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
        return False
    if cpu_only and accelerator_plugins():
        return False
    if _backends_initialized():
        raise RuntimeError(
            "keep_freed_memory() must run before the first JAX computation: JAX's backend is "
            "already initialized, and its worker threads keep the allocator arenas they have. "
            "Call it at the top of the program, or start Python with "
            + " ".join(f"{k}={v}" for k, v in MALLOC_ENV.items())
        )
    libc = ctypes.CDLL("libc.so.6")
    for name, param, value in (
        ("M_ARENA_MAX", _M_ARENA_MAX, 1),
        ("M_MMAP_MAX", _M_MMAP_MAX, 0),
        ("M_TRIM_THRESHOLD", _M_TRIM_THRESHOLD, _INT_MAX),
    ):
        if libc.mallopt(param, value) != 1:
            raise OSError(f"glibc mallopt({name}, {value}) failed")
    _applied = True
    return True
