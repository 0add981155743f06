"""Install what no SGLang plugin hook can provide; idempotent, checkable, revertible.

    tokenlake-install-patch            # apply (safe to run again)
    tokenlake-install-patch --check    # exit 0 when everything is in place
    tokenlake-install-patch --revert   # undo

What it does:

1. Checks the installed SGLang version (the plugin is verified against 0.5.23).
2. On a host without CUDA, installs the CPU stand-in for ``sgl_kernel``: the
   PyPI ``sglang-kernel`` wheel cannot be imported without CUDA. The stand-in
   lives in ``<site-packages>/tokenlake_cpu_shim/`` and a ``tokenlake-cpu-shim.pth``
   file puts that folder ahead of site-packages on ``sys.path``; the real
   package is left untouched, so ``--revert`` (or moving to a GPU host and
   running with ``--no-cpu-shim``) restores it.
3. Applies the unified diffs in ``patches/*.patch`` to the SGLang installation
   (``patch -p1`` from site-packages), skipping those already applied.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Optional

SGLANG_VERSION = "0.5.23"
SHIM_DIR = "tokenlake_cpu_shim"
SHIM_PTH = "tokenlake-cpu-shim.pth"
_SHIM_SOURCE = Path(__file__).parent / "cpu_shim" / "sgl_kernel" / "__init__.py"


def site_packages() -> Path:
    import sglang

    return Path(sglang.__file__).resolve().parent.parent


def default_patches_dir() -> Path:
    return Path(__file__).resolve().parent.parent / "patches"


def installed_sglang_version() -> Optional[str]:
    try:
        return importlib.metadata.version("sglang")
    except importlib.metadata.PackageNotFoundError:
        return None


def cuda_available() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:
        return False


# -- CPU stand-in -----------------------------------------------------------------


def _shim_paths(sp: Path) -> tuple[Path, Path]:
    return sp / SHIM_DIR / "sgl_kernel" / "__init__.py", sp / SHIM_PTH


def _pth_line(sp: Path) -> str:
    return f"import sys; sys.path.insert(0, {str(sp / SHIM_DIR)!r})\n"


def shim_installed(sp: Path) -> bool:
    module, pth = _shim_paths(sp)
    return (
        module.exists()
        and module.read_bytes() == _SHIM_SOURCE.read_bytes()
        and pth.exists()
        and pth.read_text() == _pth_line(sp)
    )


def install_shim(sp: Path) -> bool:
    """Returns True when something changed."""
    if shim_installed(sp):
        return False
    module, pth = _shim_paths(sp)
    module.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(_SHIM_SOURCE, module)
    pth.write_text(_pth_line(sp))
    return True


def remove_shim(sp: Path) -> bool:
    module, pth = _shim_paths(sp)
    changed = False
    if pth.exists():
        pth.unlink()
        changed = True
    if (sp / SHIM_DIR).exists():
        shutil.rmtree(sp / SHIM_DIR)
        changed = True
    return changed


# -- patches -----------------------------------------------------------------------


def _patch(args: list[str], patch_file: Path, sp: Path) -> bool:
    r = subprocess.run(
        ["patch", "-p1", "--batch", "--silent", "-d", str(sp), *args, "-i", str(patch_file)],
        capture_output=True,
        text=True,
    )
    return r.returncode == 0


def patch_state(patch_file: Path, sp: Path) -> str:
    """'applied', 'unapplied' or 'conflict'."""
    if _patch(["--dry-run", "-R", "-f"], patch_file, sp):
        return "applied"
    if _patch(["--dry-run", "-N"], patch_file, sp):
        return "unapplied"
    return "conflict"


def list_patches(patches_dir: Path) -> list[Path]:
    return sorted(patches_dir.glob("*.patch")) if patches_dir.is_dir() else []


# -- command -------------------------------------------------------------------------


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="tokenlake-install-patch", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true", help="report; exit 1 if anything is missing")
    mode.add_argument("--revert", action="store_true", help="remove the stand-in and reverse the patches")
    shim = p.add_mutually_exclusive_group()
    shim.add_argument("--cpu-shim", dest="cpu_shim", action="store_true", default=None,
                      help="install the CPU stand-in for sgl_kernel even if CUDA is available")
    shim.add_argument("--no-cpu-shim", dest="cpu_shim", action="store_false",
                      help="never install the CPU stand-in (and remove it if present)")
    p.add_argument("--patches-dir", type=Path, default=default_patches_dir())
    p.add_argument("--force", action="store_true",
                   help="proceed even if the installed SGLang is not the verified version")
    a = p.parse_args(argv)

    version = installed_sglang_version()
    if version is None:
        print("error: sglang is not installed in this environment", file=sys.stderr)
        return 1
    if version != SGLANG_VERSION and not a.force:
        print(
            f"error: sglang {version} is installed; sglang-tokenlake is verified against "
            f"sglang=={SGLANG_VERSION} (pip install sglang=={SGLANG_VERSION}, or pass --force)",
            file=sys.stderr,
        )
        return 1
    sp = site_packages()
    want_shim = (not cuda_available()) if a.cpu_shim is None else a.cpu_shim
    patches = list_patches(a.patches_dir)
    ok = True

    if a.check:
        have = shim_installed(sp)
        print(f"sglang {version} at {sp}")
        print(f"cpu stand-in for sgl_kernel: {'installed' if have else 'absent'}"
              f" ({'needed' if want_shim else 'not needed'})")
        ok &= have == want_shim
        for pf in patches:
            st = patch_state(pf, sp)
            print(f"patch {pf.name}: {st}")
            ok &= st == "applied"
        print("ok" if ok else "incomplete: run tokenlake-install-patch")
        return 0 if ok else 1

    if a.revert:
        for pf in reversed(patches):
            st = patch_state(pf, sp)
            if st == "applied":
                ok &= _patch(["-R"], pf, sp)
                print(f"reverted {pf.name}")
        if remove_shim(sp):
            print("removed the cpu stand-in for sgl_kernel")
        return 0 if ok else 1

    if want_shim:
        print("installed the cpu stand-in for sgl_kernel" if install_shim(sp)
              else "cpu stand-in for sgl_kernel already installed")
    elif remove_shim(sp):
        print("removed the cpu stand-in for sgl_kernel (CUDA host)")
    for pf in patches:
        st = patch_state(pf, sp)
        if st == "unapplied":
            ok &= _patch(["-N"], pf, sp)
            print(f"applied {pf.name}")
        elif st == "applied":
            print(f"{pf.name} already applied")
        else:
            print(f"error: {pf.name} does not apply to sglang {version}", file=sys.stderr)
            ok = False
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
