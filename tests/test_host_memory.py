"""boft.keep_freed_memory: XLA:CPU's large buffers are reused instead of page-faulted in at every call.

The effect is measured, not assumed: fresh Python processes run the same jitted function on a
64 MiB array and count the minor page faults of their last calls (``getrusage``), with the glibc
defaults, with :func:`boft_jax.keep_freed_memory`, and with its documented environment variables.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import textwrap

import pytest

import boft_jax as boft
from boft_jax import host_memory

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GLIBC_LINUX = sys.platform == "linux" and platform.libc_ver()[0] == "glibc"

_FAULTS = textwrap.dedent(
    """
    import resource, sys
    import boft_jax as boft
    mode = sys.argv[1]
    if mode == "call":
        assert boft.keep_freed_memory(cpu_only=False) is True
    import jax, jax.numpy as jnp
    f = jax.jit(lambda x: x * 1.5 + 0.25)
    x = jnp.full((4096, 4096), 2.0, jnp.float32)  # 64 MiB: above glibc's largest mmap threshold
    faults = []
    for _ in range(40):
        r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        y = f(x).block_until_ready()
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0)
        assert float(y[123, 456]) == 3.25
        del y
    last = sorted(faults[-16:])
    print(last[len(last) // 2])  # the median: robust to a burst while the heap grows to its steady size
    """
)


def _child_env() -> dict[str, str]:
    """This environment for a fresh Python on the CPU, without the MALLOC_* / GLIBC_TUNABLES settings."""
    env = {k: v for k, v in os.environ.items() if k not in host_memory.MALLOC_ENV and k != "GLIBC_TUNABLES"}
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
    return env


def _run_faults(modes_env: dict[str, dict[str, str]]) -> dict[str, int]:
    """Median page faults of the last 16 of 40 calls, per mode, from concurrent fresh processes."""
    procs = {}
    for mode, extra_env in modes_env.items():
        env = dict(_child_env(), **extra_env)
        procs[mode] = subprocess.Popen(
            [sys.executable, "-c", _FAULTS, mode], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
    out = {}
    for mode, p in procs.items():
        stdout, stderr = p.communicate(timeout=300)
        assert p.returncode == 0, f"{mode}: {stderr[-2000:]}"
        out[mode] = int(stdout.strip().splitlines()[-1])
    return out


@pytest.mark.skipif(not GLIBC_LINUX, reason="the setting is glibc's (mallopt); other allocators keep freed memory")
def test_keep_freed_memory_stops_page_faults_per_call():
    faults = _run_faults({"system": {}, "call": {}, "env": dict(host_memory.MALLOC_ENV)})
    # glibc defaults: every call maps its 64 MiB output anew and faults its pages in (16,384 pages
    # of 4 KiB; fewer, larger ones where transparent huge pages are always on)
    assert faults["system"] > 0, faults
    # kept memory: the output reuses a freed buffer, whether set by the call or the environment
    assert faults["call"] <= faults["system"] // 20, faults
    assert faults["env"] <= faults["system"] // 20, faults


def _run_snippet(code: str) -> str:
    """stdout of ``code`` (dedented) run by a fresh Python on the CPU, without the MALLOC_* settings."""
    res = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=_child_env(), capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    return res.stdout


_TRY_KEEP = """
try:
    boft.keep_freed_memory(cpu_only=False)
except RuntimeError as e:
    print(e)
else:
    print("no error")
"""


@pytest.mark.skipif(not GLIBC_LINUX, reason="the setting is glibc's (mallopt)")
def test_keep_freed_memory_refuses_after_jax_ran():
    setup = """
        import jax.numpy as jnp
        import boft_jax as boft
        jnp.ones(3).block_until_ready()
        """
    msg = _run_snippet(textwrap.dedent(setup) + _TRY_KEEP)
    assert "before the first JAX computation" in msg, msg
    for k, v in host_memory.MALLOC_ENV.items():  # the shell alternative, spelled out
        assert f"{k}={v}" in msg


@pytest.mark.skipif(not GLIBC_LINUX, reason="the setting is glibc's (mallopt)")
def test_keep_freed_memory_refuses_after_other_threads_allocated():
    # Threads that allocated before the call keep arenas of their own, where large blocks are
    # mapped anew at every call; a later arena limit cannot move them.
    setup = """
        import threading
        import boft_jax as boft
        def work():
            for _ in range(200):
                bytearray(1 << 16)
        threads = [threading.Thread(target=work) for _ in range(4)]
        [t.start() for t in threads]
        [t.join() for t in threads]
        """
    msg = _run_snippet(textwrap.dedent(setup) + _TRY_KEEP)
    assert "came too late" in msg and "arena" in msg, msg
    assert "MALLOC_ARENA_MAX=1" in msg


@pytest.mark.skipif(not GLIBC_LINUX, reason="the setting is glibc's (mallopt)")
def test_kept_memory_is_never_trimmed_and_a_second_call_is_a_no_op():
    # 2.5 GiB of heap (reserved, never touched) freed: glibc would give it back above the trim
    # threshold; the setting keeps it (a threshold of INT_MAX would trim here).
    out = _run_snippet(
        """
        import ctypes
        import boft_jax as boft
        libc = ctypes.CDLL("libc.so.6")
        libc.sbrk.restype = ctypes.c_void_p
        libc.malloc.restype = ctypes.c_void_p
        assert boft.keep_freed_memory(cpu_only=False) is True
        assert boft.keep_freed_memory(cpu_only=False) is True
        p = libc.malloc(ctypes.c_size_t(5 * 2**29))
        assert p
        end = libc.sbrk(0)
        libc.free(ctypes.c_void_p(p))
        print(end - libc.sbrk(0))
        """
    )
    assert int(out.strip().splitlines()[-1]) == 0, out


def test_keep_freed_memory_leaves_accelerator_machines_alone(monkeypatch):
    monkeypatch.setattr(host_memory, "_applied", False)
    monkeypatch.setattr(host_memory, "accelerator_plugins", lambda: ["cuda"])
    calls = []
    monkeypatch.setattr(host_memory.ctypes, "CDLL", lambda *a, **k: calls.append(a))
    assert boft.keep_freed_memory() is False
    assert calls == []


def test_accelerator_plugins_respects_jax_platforms(monkeypatch):
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    assert host_memory.accelerator_plugins() == []
    monkeypatch.setenv("JAX_PLATFORMS", "cuda,cpu")
    monkeypatch.setattr(host_memory.importlib.metadata, "entry_points", lambda group: [_EP("xla_cuda13")])
    monkeypatch.setattr(host_memory.importlib.util, "find_spec", lambda name: None)
    assert host_memory.accelerator_plugins() == ["xla_cuda13"]


class _EP:
    def __init__(self, name):
        self.name = name


def test_configure_says_what_is_in_effect(monkeypatch):
    # The status line train.finetune and the benchmarks print behind their --system-malloc flag.
    for k in host_memory.MALLOC_ENV:
        monkeypatch.delenv(k, raising=False)
    assert host_memory.configure(True) == "system defaults (--system-malloc)"
    monkeypatch.setenv("MALLOC_ARENA_MAX", "1")
    assert host_memory.configure(True).endswith("(environment sets MALLOC_ARENA_MAX)")
    monkeypatch.delenv("MALLOC_ARENA_MAX")

    def too_late(**kw):
        raise RuntimeError("late")

    def refused(**kw):
        raise OSError("glibc mallopt(M_ARENA_MAX, 1) failed")

    monkeypatch.setattr(host_memory, "keep_freed_memory", too_late)
    assert "came too late" in host_memory.configure(False)
    monkeypatch.setattr(host_memory, "keep_freed_memory", refused)
    assert host_memory.configure(False) == "system defaults (glibc mallopt(M_ARENA_MAX, 1) failed)"
    monkeypatch.setattr(host_memory, "keep_freed_memory", lambda **kw: True)
    assert host_memory.configure(False).startswith("freed memory kept for reuse")
    monkeypatch.setattr(host_memory, "keep_freed_memory", lambda **kw: False)
    assert "does not apply here" in host_memory.configure(False)


def test_entry_points_take_system_malloc():
    import argparse

    from benchmarks import _util
    from train import finetune

    assert finetune.build_parser().parse_args(["--system-malloc"]).system_malloc is True
    ap = argparse.ArgumentParser()
    _util.add_malloc_flag(ap)
    assert ap.parse_args(["--system-malloc"]).system_malloc is True
    assert ap.parse_args([]).system_malloc is False
