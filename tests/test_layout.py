"""Packaging hazards that only show when running from the repository root."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_kernels_dir_does_not_shadow_the_kernels_package():
    # SGLang's FA3 path does `from kernels import get_kernel` (the PyPI package
    # `kernels`). Our top-level kernels/ is a namespace folder (no __init__.py),
    # imported as tokenlake_kernels, so it never shadows that package when a
    # server is started from the repository root.
    assert not (ROOT / "kernels" / "__init__.py").exists()
    out = subprocess.run(
        [sys.executable, "-c", "import kernels, sys; print(kernels.__file__ or '')"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert str(ROOT / "kernels") not in out.stdout, out.stdout
