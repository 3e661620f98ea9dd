"""``python -m macvtapdp.plugin --name=... --lower=...``: one resource's process.

supervisord starts it with the command line ``settings.to_argv`` rendered; it
is not a command people type (``macvtapdp run`` is). It imports only what
serving needs: it runs once per resource, so every module costs N times.
"""

from __future__ import annotations

import os
import sys


def main(argv: list[str] | None = None) -> int:
    # gRPC's C core logs at INFO (e.g. every GOAWAY) unless told otherwise
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    from macvtapdp import logs, settings
    from macvtapdp.errors import PermanentError
    from macvtapdp.linux import process

    try:
        serve_settings = settings.from_argv(settings.Serve, sys.argv[1:] if argv is None else argv)
        logs.configure(serve_settings.resource.name)
        process.die_with_parent()
        process.raise_fd_limit()
        from macvtapdp.plugin.serve import serve

        return serve(serve_settings)
    except PermanentError as err:
        for line in str(err).splitlines():
            print(f"macvtapdp: error: {line}", file=sys.stderr)
        return 2
    finally:
        logs.flush()


if __name__ == "__main__":
    code = main()
    # Everything is closed, removed and flushed by now: skip the interpreter's teardown,
    # where grpc's C core joins its threads (0.3-0.5 s with ten resources stopping at
    # once, bench/reconfig.py), so that a restarted resource starts again sooner.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
