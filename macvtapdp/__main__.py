"""Entry point of the ``macvtapdp`` console script and ``python -m macvtapdp``."""

from __future__ import annotations

import sys

# What the container runs by itself: keep typer off its path (see entry)
CONTAINER_COMMANDS = ("serve", "run", "reconcile", "watchdog")


def main() -> None:
    args = sys.argv[1:]
    if args[:1] and args[0] in CONTAINER_COMMANDS and not {"-h", "--help"} & set(args):
        from macvtapdp import entry

        raise SystemExit(entry.main(args[0], args[1:]))
    from macvtapdp.cli import app

    app()


if __name__ == "__main__":
    main()
