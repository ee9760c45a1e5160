"""``python -m dolfinx_pinn``: the ``dolfinx-pinn`` console script (see :mod:`dolfinx_pinn.cli`)."""

from __future__ import annotations

import sys

from dolfinx_pinn.cli import main as _main

__all__ = ["main"]


def main() -> None:
    """Run the command line and exit with its code."""
    sys.exit(_main())


if __name__ == "__main__":
    main()
