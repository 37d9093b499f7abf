"""The wheel that ``pip install .`` builds holds every file the library and the jobs read.

An editable install (``make``, ``pip install -e .``) reads the checkout itself, so a file left out
of the wheel shows only in a regular install.  Until 2026-12-05 the main job's bundled base
checkpoints (``train/assets/``) were missing from the wheel, and ``python -m train.finetune``
failed after ``pip install .`` with "--checkpoint .../site-packages/train/assets/vit-digits-base:
not a directory".  The wheel is built offline (``--no-build-isolation``: the build backend,
setuptools, comes with the ``test`` extra).

The lower bounds of the dependencies are the pins of ``constraints-min.txt``, which ``make
test-min`` tests (until 2026-12-05 the bounds were jax >= 0.4.30, flax >= 0.10, ...: under those
versions ``import boft_jax`` failed); the last test keeps the two lists in step.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import textwrap
import tomllib
import zipfile

import jax
import numpy as np
import pytest

from boft_jax.models import from_pretrained

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGES = ("boft_jax", "train")


def _source_files() -> list[str]:
    """Every file of the installed packages in the checkout, as wheel paths (no bytecode)."""
    files = []
    for pkg in PACKAGES:
        for p in sorted((ROOT / pkg).rglob("*")):
            if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc":
                files.append(p.relative_to(ROOT).as_posix())
    return files


def _pip(*args: str, cwd: pathlib.Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "pip", *args], cwd=cwd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"pip {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> pathlib.Path:
    """The wheel built from a copy of the checkout (the build writes ``build/`` and egg-info there)."""
    src = tmp_path_factory.mktemp("src")
    for name in ["pyproject.toml", "README.md", "LICENSE", *_source_files()]:
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, src / name)
    dist = tmp_path_factory.mktemp("dist")
    _pip("wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q", "-w", str(dist), str(src), cwd=dist)
    wheels = sorted(dist.glob("boft_jax-*.whl"))
    assert len(wheels) == 1, f"expected one boft_jax wheel in {dist}, found {[w.name for w in dist.iterdir()]}"
    return wheels[0]


@pytest.mark.slow  # builds a wheel in a subprocess (~5 s)
def test_the_wheel_holds_every_package_file_byte_for_byte(wheel):
    expected = _source_files()
    assert any(f.startswith("train/assets/") for f in expected)  # the files this test is about
    with zipfile.ZipFile(wheel) as zf:
        held = {n for n in zf.namelist() if ".dist-info/" not in n}
        missing = [f for f in expected if f not in held]
        assert not missing, f"the wheel lacks {len(missing)} file(s) of the checkout: {missing[:10]}"
        extra = sorted(held - set(expected))
        assert not extra, f"the wheel holds files that are not in the checkout's packages: {extra[:10]}"
        for f in expected:
            assert hashlib.sha256(zf.read(f)).digest() == hashlib.sha256((ROOT / f).read_bytes()).digest(), f


@pytest.mark.slow  # installs the wheel and loads both checkpoints in a subprocess (~5 s)
def test_an_installed_wheel_loads_its_bundled_base_checkpoints(wheel, tmp_path):
    site = tmp_path / "site"
    _pip("install", "--no-deps", "--no-index", "-q", "--target", str(site), str(wheel), cwd=tmp_path)
    # A fresh interpreter that finds boft_jax and train in the installed copy first (the
    # dependencies come from this environment), started outside the checkout.
    script = textwrap.dedent(
        """
        import json, sys
        import numpy as np, jax
        import boft_jax, train
        from boft_jax.models import from_pretrained
        from train.make_base import VIT_BASE
        from train.text_tasks import T5_BASE
        out = {"boft_jax": boft_jax.__file__, "train": train.__file__}
        for name, path in (("vit", VIT_BASE), ("t5", T5_BASE)):
            module, params = from_pretrained(path)
            leaves = jax.tree.leaves(params)
            out[name] = {"path": str(path), "type": type(module).__name__, "n": sum(int(np.size(x)) for x in leaves),
                         "abs_sum": float(sum(np.abs(np.asarray(x, np.float64)).sum() for x in leaves))}
        print(json.dumps(out))
        """
    )
    env = {**os.environ, "PYTHONPATH": str(site)}
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    for key in ("boft_jax", "train"):
        assert pathlib.Path(got[key]).resolve().is_relative_to(site.resolve()), (key, got[key])

    for name, directory, module_type in (("vit", "vit-digits-base", "ViT"), ("t5", "t5-bytes-base", "T5")):
        assert pathlib.Path(got[name]["path"]).resolve().is_relative_to(site.resolve()), got[name]
        assert got[name]["type"] == module_type
        _, params = from_pretrained(ROOT / "train" / "assets" / directory)  # the checkout's copy
        leaves = jax.tree.leaves(params)
        assert got[name]["n"] == sum(int(np.size(x)) for x in leaves)
        want = float(sum(np.abs(np.asarray(x, np.float64)).sum() for x in leaves))
        assert got[name]["abs_sum"] == pytest.approx(want, rel=1e-12), name


def _name(name: str) -> str:
    """A distribution name as pip compares them (case and ``-`` / ``_`` / ``.`` ignored)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def test_lower_bounds_are_the_tested_minimum_pins():
    """Every dependency of the library and of the ``train`` extra has a lower bound, equal to its
    pin in constraints-min.txt, and every pin there (jaxlib aside: jax pins its own) is such a bound."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    bounds = {}
    for req in project["dependencies"] + project["optional-dependencies"]["train"]:
        m = re.fullmatch(r"([A-Za-z0-9_.-]+)>=([0-9][0-9a-z.]*)", req.strip())
        assert m, f"pyproject.toml: dependency {req!r} is not of the form 'name>=version'"
        bounds[_name(m[1])] = m[2]
    pins = {}
    for line in (ROOT / "constraints-min.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            m = re.fullmatch(r"([A-Za-z0-9_.-]+)==([0-9][0-9a-z.]*)", line)
            assert m, f"constraints-min.txt: {line!r} is not of the form 'name==version'"
            pins[_name(m[1])] = m[2]
    assert pins.pop("jaxlib") == pins["jax"]
    assert bounds == pins
