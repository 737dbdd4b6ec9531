"""A tiny MCP server over stdio for the `mcp:` adapter tests, written with the official SDK.

Tools: `add` (read-only), `write_note` (additive: destructiveHint false), `read_notes`
(read-only), `delete_notes` (destructive), `explode` (raises), `pid`, `crash` (the
process exits mid-call) and `nap` (sleeps). Flags: `--fail` exits at once with a
message on stderr; `--own-answer` adds a server tool named `answer`.
"""

from __future__ import annotations

import os
import sys

import anyio
from mcp.types import ToolAnnotations

try:  # mcp >= 2
    from mcp.server.mcpserver import MCPServer as Server
except ImportError:  # mcp 1.x
    from mcp.server.fastmcp import FastMCP as Server

READ_ONLY = ToolAnnotations.model_validate({"readOnlyHint": True})
ADDITIVE = ToolAnnotations.model_validate({"readOnlyHint": False, "destructiveHint": False})
DESTRUCTIVE = ToolAnnotations.model_validate({"readOnlyHint": False, "destructiveHint": True})

server = Server("toy-notes", instructions="A notebook. Notes live as long as this server process.")
notes: list[str] = []


@server.tool(annotations=READ_ONLY)
def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


@server.tool(annotations=ADDITIVE)
def write_note(text: str) -> str:
    """Append a note."""
    notes.append(text)
    return f"saved note {len(notes)}"


@server.tool(annotations=READ_ONLY)
def read_notes() -> str:
    """All notes, one per line."""
    return "\n".join(notes) or "(no notes)"


@server.tool(annotations=DESTRUCTIVE)
def delete_notes() -> str:
    """Delete every note."""
    count = len(notes)
    notes.clear()
    return f"deleted {count} notes"


@server.tool()
def explode(message: str) -> str:
    """Always fails with the given message."""
    raise ValueError(message)


@server.tool(annotations=READ_ONLY)
def pid() -> str:
    """The server's process id."""
    return str(os.getpid())


@server.tool()
def crash() -> str:
    """End the server process in the middle of the call."""
    os._exit(3)


@server.tool()
def spawn_helper() -> str:
    """Start a long-lived helper process (as servers start browsers or language servers); its pid."""
    import subprocess

    helper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    return str(helper.pid)


@server.tool(annotations=READ_ONLY)
async def nap(seconds: float) -> str:
    """Sleep, then answer."""
    await anyio.sleep(seconds)
    return "awake"


if __name__ == "__main__":
    if "--fail" in sys.argv:
        print("toy server: refusing to start (--fail)", file=sys.stderr)
        sys.exit(2)
    if "--own-answer" in sys.argv:

        @server.tool(annotations=READ_ONLY)
        def answer(question: str) -> str:
            """The server's own tool that happens to be called answer."""
            return "42"

    server.run()
