#!/usr/bin/env python3
"""Same as the `tokenlake-install-patch` console script (see sglang_tokenlake/installer.py)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sglang_tokenlake.installer import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
