"""Every module of the package imports on its own, first thing in a fresh interpreter, as a Ray worker imports the
module of the function it is sent (a worker running a `complete` task imports `zephyr_ray.feedback.complete` first).
An import cycle that one order hides fails here: one did fail the demo's `complete` stage in a worker while every
test passed (CI run 27)."""

import pkgutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import zephyr_ray


def test_every_module_imports_first_in_a_fresh_interpreter():
    modules = sorted(m.name for m in pkgutil.walk_packages(zephyr_ray.__path__, "zephyr_ray."))
    assert len(modules) > 30

    def first_import(module: str) -> tuple[str, int, str]:
        done = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True, timeout=300)
        return module, done.returncode, (done.stderr.strip().splitlines() or [""])[-1] if done.returncode else ""

    with ThreadPoolExecutor(2) as pool:
        failed = [(module, error) for module, code, error in pool.map(first_import, modules) if code]
    assert not failed, failed
