"""Entry point of the ``macvtapdp`` console script and ``python -m macvtapdp``."""

from __future__ import annotations

import sys


def main() -> None:
    from macvtapdp.cli import main as cli

    sys.exit(cli())


if __name__ == "__main__":
    main()
