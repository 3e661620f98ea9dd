"""Entry point of the ``macvtapdp`` console script and ``python -m macvtapdp``."""

from __future__ import annotations


def main() -> None:
    from macvtapdp.cli import app

    app()


if __name__ == "__main__":
    main()
