"""Keep freed host memory in the process, so XLA:CPU's large buffers stop page-faulting on every call.

Why: on Linux with glibc, ``malloc`` serves every block above 32 MiB (and every large block
allocated from a worker thread's arena) with a fresh ``mmap`` and gives it back to the kernel
with ``munmap`` when it is freed.  XLA:CPU allocates each call's outputs and temporaries anew, so
a jitted function whose buffers are large touches brand-new pages on *every* call, and the kernel
zero-fills them one page fault at a time (4 KiB pages, unless transparent huge pages are always on).  For memory-bound work that is most of the cost:
``boft.rotate`` on ``(4096, 4096)`` float32 activations (two 64 MiB buffers, 33k page faults per
call) takes about twice as long as the same computation on reused memory (BENCHMARKS.md, issue 2).
A compute-bound dense matmul barely notices.

:func:`keep_freed_memory` sets glibc's allocator (``mallopt``) so that freed memory stays in the
process and is reused: one arena for all threads, no ``mmap`` for large blocks, no trimming of the
heap.  The shell equivalent, for any Python process, is::

    MALLOC_ARENA_MAX=1 MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=18446744073709551615 python ...

Costs:

- Host memory.  The process never hands freed memory back, and one heap without ``mmap``
  fragments: a review measured a peak RSS of 1.06-1.19 GiB against 0.42-0.43 GiB with glibc's
  defaults for a loop of jitted 4096 x 4096 einsums (levelling off after about 30 calls), and
  795 vs 696 MiB for 3 steps of the default ``train.finetune`` job.
- All threads share one arena lock: harmless for XLA, which allocates few, large buffers, on the
  2-core machine where it was measured; not measured with many cores.

``train/finetune.py`` applies it when no accelerator plugin is installed (``--system-malloc`` opts
out).

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
import pkgutil
import platform
import sys

__all__ = ["MALLOC_ENV", "accelerator_plugins", "configure", "keep_freed_memory", "preset_env"]

# glibc <malloc.h> parameter numbers for mallopt()
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
_NO_TRIM = -1  # M_TRIM_THRESHOLD = (size_t) -1: never trim (mallopt(3)); INT_MAX would trim above 2 GiB

MALLOC_ENV: dict[str, str] = {
    "MALLOC_ARENA_MAX": "1",
    "MALLOC_MMAP_MAX_": "0",
    "MALLOC_TRIM_THRESHOLD_": str(2**64 - 1),
}
"""The same settings as environment variables (read by glibc when a process starts)."""


_applied = False


def accelerator_plugins() -> list[str]:
    """Installed JAX accelerator plugins (``jax_plugins`` entry points, ``libtpu``), by name.

    Empty on a CPU-only installation; ``JAX_PLATFORMS=cpu`` (environment) also counts as CPU-only.
    """
    platforms = [p.strip() for p in os.environ.get("JAX_PLATFORMS", "").split(",") if p.strip()]
    if platforms and all(p == "cpu" for p in platforms):
        return []
    found = {ep.name for ep in importlib.metadata.entry_points(group="jax_plugins")}
    try:  # plugins installed as jax_plugins.* namespace packages (JAX finds these too)
        import jax_plugins

        found |= {m.name for m in pkgutil.iter_modules(jax_plugins.__path__)}
    except ImportError:
        pass
    if importlib.util.find_spec("libtpu") is not None:
        found.add("libtpu")
    return sorted(found)


def preset_env() -> str:
    """``" (environment sets MALLOC_...)"`` naming the :data:`MALLOC_ENV` variables already set, or ``""``.

    For status lines: with them set, glibc was configured at start-up whatever is called later.
    """
    preset = [k for k in MALLOC_ENV if k in os.environ]
    return f" (environment sets {', '.join(preset)})" if preset else ""


def _backends_initialized() -> bool:
    if "jax" not in sys.modules:
        return False
    try:
        from jax._src import xla_bridge
    except ImportError:  # pragma: no cover - a JAX without this private module: cannot tell
        return False
    check = getattr(xla_bridge, "backends_are_initialized", None)
    return bool(check()) if check is not None else False


def _malloc_arenas(libc) -> int | None:
    """How many malloc arenas exist (``malloc_info``), or ``None`` if glibc cannot say."""
    try:
        buf, size = ctypes.c_char_p(), ctypes.c_size_t()
        libc.open_memstream.restype = ctypes.c_void_p
        stream = libc.open_memstream(ctypes.byref(buf), ctypes.byref(size))
        if not stream:
            return None
        libc.malloc_info(0, ctypes.c_void_p(stream))
        libc.fclose(ctypes.c_void_p(stream))
        text = ctypes.string_at(buf, size.value).decode("ascii", "replace")
        libc.free(buf)
    except (AttributeError, OSError):
        return None
    return text.count("<heap nr=")


def keep_freed_memory(*, cpu_only: bool = True) -> bool:
    """Make glibc keep freed memory for reuse (see the module docstring); call it before JAX runs.

    Args:
      cpu_only: do nothing when an accelerator plugin is installed (:func:`accelerator_plugins`):
        there XLA's large buffers live on the device, and the host does not need the setting.

    Returns:
      ``True`` when the settings are in effect (applied now or by an earlier call), ``False`` when
      nothing was done: not Linux with glibc (the settings are glibc's), or ``cpu_only`` and an
      accelerator plugin is installed.

    Raises:
      RuntimeError: too late for the setting to reach XLA's buffers, because threads already
        allocate from their own arenas (they keep them): JAX's backend is initialized (a
        computation or ``jax.devices()`` ran), or other threads have already allocated (a Jupyter
        kernel's, a data loader's).  Call it first thing, or set :data:`MALLOC_ENV` in the
        environment before Python starts (that covers every thread).
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
    env = " ".join(f"{k}={v}" for k, v in MALLOC_ENV.items())
    if _backends_initialized():
        raise RuntimeError(
            "keep_freed_memory() must run before the first JAX computation: JAX's backend is "
            "already initialized, and its worker threads keep the allocator arenas they have. "
            f"Call it at the top of the program, or start Python with {env}"
        )
    libc = ctypes.CDLL("libc.so.6")
    arenas = _malloc_arenas(libc)
    if arenas is not None and arenas > 1:
        raise RuntimeError(
            f"keep_freed_memory() came too late: other threads have already allocated from {arenas - 1}"
            " malloc arena(s) of their own, and XLA's threads could share those (where large blocks are"
            f" mapped anew at every call). Start Python with {env} instead (it covers every thread)"
        )
    for name, param, value in (
        ("M_ARENA_MAX", _M_ARENA_MAX, 1),
        ("M_MMAP_MAX", _M_MMAP_MAX, 0),
        ("M_TRIM_THRESHOLD", _M_TRIM_THRESHOLD, _NO_TRIM),
    ):
        if libc.mallopt(param, value) != 1:
            raise OSError(f"glibc mallopt({name}, {value}) failed")
    _applied = True
    return True


def configure(system_malloc: bool = False) -> str:
    """For command-line entry points: :func:`keep_freed_memory` unless ``system_malloc``; never raises.

    Returns the status line they print: what is in effect and why, plus :func:`preset_env`.  Call
    it before JAX's first computation (``train.finetune`` and the benchmarks do, behind their
    ``--system-malloc`` flag).

    Example:
      >>> from boft_jax import host_memory
      >>> host_memory.configure(system_malloc=True)  # doctest: +SKIP
      'system defaults (--system-malloc)'
    """
    note = preset_env()
    if system_malloc:
        return "system defaults (--system-malloc)" + note
    try:
        kept = keep_freed_memory()
    except RuntimeError:  # too late: JAX already ran, or other threads allocated (tests, notebooks)
        return "system defaults (keep_freed_memory() came too late in this process)" + note
    except OSError as e:
        return f"system defaults ({e})" + note
    if kept:
        return "freed memory kept for reuse (boft.keep_freed_memory())" + note
    return "system defaults (keep_freed_memory() does not apply here: not glibc, or an accelerator plugin)" + note
