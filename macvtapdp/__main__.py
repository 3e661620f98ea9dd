"""Entry point of the ``macvtapdp`` console script and ``python -m macvtapdp``.

The probes' ``status`` command lines are answered without loading typer (about
half of a probe's cost, bench/probes.py); everything else, ``status --help``
and mistakes included, goes to the typer CLI.
"""

from __future__ import annotations

import sys


def main() -> None:
    if sys.argv[1:2] == ["status"]:
        from macvtapdp.node import status

        code = status.main(sys.argv[2:])
        if code is not None:
            sys.exit(code)
    from macvtapdp.cli import main as cli

    sys.exit(cli())


if __name__ == "__main__":
    main()
