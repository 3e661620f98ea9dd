"""Entry point of the ``macvtapdp`` console script and ``python -m macvtapdp``."""

from __future__ import annotations

import sys


def main() -> None:
    args = sys.argv[1:]
    if args[:1] in (["serve"], ["run"], ["reconcile"]) and not {"-h", "--help"} & set(args):
        # what the container runs by itself: keep typer off its path (see entry)
        from macvtapdp import entry

        raise SystemExit(entry.main(args[0], args[1:]))
    from macvtapdp.cli import app

    app()


if __name__ == "__main__":
    main()
