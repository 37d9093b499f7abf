"""Running the training job (``python -m train.finetune``) as its own process from a test."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def job_env(devices: int | None = None, *, fast_compile: bool = False) -> dict:
    """Environment for a job subprocess, optionally with ``devices`` simulated CPU devices.

    XLA_FLAGS: by default the caller's own (not the suite's compile-time settings, see conftest),
    for jobs whose time goes into running many steps.  ``fast_compile=True`` keeps the suite's
    settings instead, for short jobs whose time goes into compiling: they compile faster, and a
    program the test process already compiled with the same settings comes from the suite's
    persistent compilation cache (the subprocess inherits its folder) instead of being compiled
    again.
    """
    flags = os.environ.get("XLA_FLAGS", "") if fast_compile else os.environ.get("BOFT_JAX_TEST_USER_XLA_FLAGS", "")
    if devices:
        flags = f"{flags} --xla_force_host_platform_device_count={devices}".strip()
    return dict(os.environ, PYTHONPATH=str(ROOT), TF_CPP_MIN_LOG_LEVEL="2", XLA_FLAGS=flags)


def job_summary(args: list[str], out: Path) -> dict:
    """Run ``python -m train.finetune ARGS`` as its own process (with the caller's XLA_FLAGS, see
    conftest: a training run is faster with XLA's default compilation) and read its summary.md."""
    r = subprocess.run(
        [sys.executable, "-m", "train.finetune", *args], capture_output=True, text=True, env=job_env(), cwd=ROOT, timeout=1200
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    summary = (out / "summary.md").read_text()
    assert summary.strip() in r.stdout, "the job did not print its summary"
    rows = dict(re.findall(r"^\| ([^|]+?) +\| (.+?) +\|$", summary, flags=re.M))
    trainable, base = re.fullmatch(r"([\d,]+) \([\d.]+% of ([\d,]+)\)", rows["trainable params"]).groups()
    metric = next(k.removeprefix("held-out ").removesuffix(" before") for k in rows if k.endswith(" before"))
    return {
        "trainable": int(trainable.replace(",", "")),
        "base": int(base.replace(",", "")),
        "acc_before": float(rows[f"held-out {metric} before"]),
        "acc_after": float(rows[f"held-out {metric} after"]),
        "rows": rows,
    }
