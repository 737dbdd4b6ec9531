"""Runs an MCP server and, once it has exited, kills what it left behind in its process group.

The MCP SDK starts a stdio server in a new session, so the server and every helper it
starts (a browser, a language server) share one process group; but the SDK kills that
group only when the server fails to exit by itself, so a server that exits cleanly
leaves its helpers running. `McpEnv` therefore starts this guard in the server's place:
it runs the server with the same stdin, stdout and stderr, passes SIGTERM and SIGINT on
to it, and when it has exited kills the whole group (this guard last). It touches the
group only when it leads one of its own, so run by hand it never kills its caller.

A plain script on purpose (standard library only, nothing of safactory imported), so it
starts fast: `python mcp_guard.py COMMAND [ARG ...]`.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from types import FrameType


def main(argv: list[str]) -> int:
    if not argv:
        print("usage: mcp_guard.py COMMAND [ARG ...]", file=sys.stderr)
        return 2
    try:
        server = subprocess.Popen(argv)
    except OSError as exc:
        print(f"cannot start {argv[0]!r}: {exc}", file=sys.stderr)
        return 127

    def forward(signum: int, _frame: FrameType | None) -> None:
        if server.poll() is None:
            server.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    code = server.wait()
    sys.stderr.flush()
    if os.getpgrp() == os.getpid():  # the leader of a group of its own: the server's helpers are in it
        os.killpg(os.getpgrp(), signal.SIGKILL)
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
