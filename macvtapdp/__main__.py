"""Entry point of the ``macvtapdp`` console script and ``python -m macvtapdp``."""

from __future__ import annotations

import sys


def main() -> None:
    args = sys.argv[1:]
    if args[:1] == ["serve"] and not {"-h", "--help"} & set(args):
        # the per-resource process: keep typer off its path (see servecmd)
        from macvtapdp import servecmd

        raise SystemExit(servecmd.main(args[1:]))
    from macvtapdp.cli import app

    app()


if __name__ == "__main__":
    main()
