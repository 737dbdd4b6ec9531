"""The sandbox (safactory/sim/sandbox.py) with real subprocesses and real namespaces: it ends runaway
programs by the limit they hit, keeps output bounded, shows nothing of the host's files or network,
leaves no directory and no process behind, and answers an environment's tool call with a result."""

from __future__ import annotations

import asyncio
import os
import socket
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest

from safactory.sim import sandbox
from safactory.sim.env import EnvSpec, ToolEnvironment
from safactory.sim.sandbox import SANDBOX_UIDS, WORKDIR, Limits, Sandbox, SandboxResult, SandboxUnavailable
from safactory.types import Message, Task, ToolCall, ToolSpec

REPO = Path(__file__).resolve().parents[1]
FAST = Limits(cpu_s=2, wall_s=20, memory_bytes=256 << 20, file_size_bytes=1 << 20, disk_bytes=8 << 20)


def run(program: str | list[str], limits: Limits = FAST, isolation: str = "namespaces", **kw: Any) -> SandboxResult:
    return asyncio.run(Sandbox(limits, isolation=isolation).run(program, **kw))  # type: ignore[arg-type]


def run_marked(code: str, limits: Limits = FAST) -> tuple[SandboxResult, str]:
    """Run `code` with a unique word on its command line (forked children keep it), to find leftovers."""
    marker = f"sandbox-test-{uuid.uuid4().hex}"
    return run(["python3", "main.py", marker], limits, files={"main.py": code}), marker


def processes_with(marker: str) -> list[int]:
    """Host processes whose command line holds `marker`."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and marker.encode() in (entry / "cmdline").read_bytes():
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def test_runs_code_with_stdin_files_and_a_minimal_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SAFACTORY_TEST_SECRET", "hunter2")
    code = (
        "import os, sys, helper\n"
        "print(helper.double(int(sys.stdin.read())))\n"
        "print(open('data/in.txt').read())\n"
        "print(os.getcwd(), sorted(os.environ))\n"
        "print(repr(os.environ.get('SAFACTORY_TEST_SECRET')), os.environ['EXTRA'])\n"
        "print(os.getuid())\n"
    )
    result = run(
        code,
        stdin="21",
        files={"helper.py": "def double(x):\n    return 2 * x\n", "data/in.txt": b"from a file"},
        env={"EXTRA": "given"},
    )
    assert result.ok, result
    lines = result.stdout.splitlines()
    assert lines[0] == "42" and lines[1] == "from a file"
    assert lines[2] == f"{WORKDIR} ['EXTRA', 'HOME', 'LANG', 'PATH', 'TMPDIR']"
    assert lines[3] == "None given"
    if os.geteuid() == 0:  # not root: a uid of its own
        assert SANDBOX_UIDS[0] <= int(lines[4]) < SANDBOX_UIDS[1]
    assert "exit code: 0" in result.observation() and "42" in result.observation()


def test_commands_crashes_and_missing_programs_are_results() -> None:
    assert run(["sh", "-c", "echo out; echo err >&2; exit 4"]).stdout == "out\n"
    shell = run(["sh", "-c", "echo out; echo err >&2; exit 4"])
    assert (shell.exit_code, shell.stderr, shell.killed_by) == (4, "err\n", None)
    crash = run("import os, signal\nos.kill(os.getpid(), signal.SIGSEGV)")
    assert crash.exit_code == -11 and crash.killed_by is None
    missing = run(["no-such-program-here"])
    assert missing.exit_code == 127 and "no-such-program-here" in missing.stderr


def test_cpu_loop_is_killed_for_cpu() -> None:
    result = run("while True:\n    pass", Limits(cpu_s=1, wall_s=30))
    assert result.killed_by == "cpu" and result.exit_code != 0
    assert "CPU time" in result.observation()


def test_sleeping_program_is_killed_at_wall_time() -> None:
    result = run("import time\nprint('started', flush=True)\nwhile True:\n    time.sleep(1)", Limits(wall_s=1.5))
    assert (result.killed_by, result.exit_code, result.stdout) == ("wall", -9, "started\n")


def test_memory_hog_is_stopped() -> None:
    result = run("blocks = []\nwhile True:\n    blocks.append(bytearray(16 << 20))")
    assert result.killed_by == "memory" and result.exit_code != 0


def test_file_size_bomb_stops_at_the_limit() -> None:
    code = (
        "import os\n"
        "try:\n"
        "    with open('bomb', 'wb') as f:\n"
        "        f.write(b'x' * (8 << 20))\n"
        "finally:\n"
        "    print(os.path.getsize('bomb'))\n"
    )
    result = run(code)
    assert result.killed_by == "file_size" and result.exit_code == 1
    assert int(result.stdout) == FAST.file_size_bytes


def test_many_files_cannot_fill_the_disk() -> None:
    code = (
        "import errno\n"
        "for i in range(64):\n"
        "    try:\n"
        "        open(f'/tmp/f{i}', 'wb').write(b'x' * (512 << 10))\n"
        "    except OSError as e:\n"
        "        print(errno.errorcode[e.errno], i)\n"
        "        break\n"
    )
    code_, written = run(code).stdout.split()
    assert code_ == "ENOSPC" and int(written) < 16  # 8 MiB of tmpfs for 512 KiB files


def test_fork_bomb_is_bounded_and_nothing_survives() -> None:
    code = (
        "import os, time\n"
        "n = 0\n"
        "try:\n"
        "    while n < 200:  # bounded here too, so that a broken limit fails the test, not the machine\n"
        "        if os.fork() == 0:\n"
        "            time.sleep(120)\n"
        "            os._exit(0)\n"
        "        n += 1\n"
        "    print(n, 'unbounded')\n"
        "except OSError as e:\n"
        "    print(n, type(e).__name__)\n"
    )
    limits = Limits(wall_s=60, processes=16)
    result, marker = run_marked(code, limits)
    count, error = result.stdout.split()
    assert error == "BlockingIOError" and int(count) < limits.processes
    assert result.killed_by is None  # the sleeping children held stdout: they died with the program
    assert processes_with(marker) == []
    wild = run("import os\nwhile True:\n    os.fork()", Limits(wall_s=20, processes=16))
    assert wild.exit_code == 1 and "BlockingIOError" in wild.stderr and wild.killed_by is None
    escape = (
        "import os, time\n"
        "for _ in range(4):\n"
        "    if os.fork() == 0:\n"
        "        os.setsid()  # out of the process group the parent kills\n"
        "        time.sleep(120)\n"
        "print('forked', flush=True)\n"
        "time.sleep(120)\n"
    )
    escaped, marker = run_marked(escape, Limits(wall_s=2))
    assert (escaped.killed_by, escaped.stdout) == ("wall", "forked\n")
    assert processes_with(marker) == []  # the pid namespace took the new sessions with it


def test_huge_output_is_cut_and_the_flood_killed() -> None:
    flood = run("import sys\nwhile True:\n    sys.stdout.write('x' * 65536)")
    assert flood.killed_by == "output" and flood.truncated
    assert flood.stdout == "x" * FAST.output_bytes
    long = run("print('y' * 200000)")
    assert long.ok and long.truncated and long.stdout == "y" * FAST.output_bytes


def test_cannot_read_or_write_outside_its_directory(tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("top secret")
    paths = [str(REPO / "README.md"), "/etc/shadow", str(secret), str(Path.home() / ".bashrc")]
    assert (REPO / "README.md").exists()
    code = (
        "import os, sys\n"
        "for path in sys.argv[1:]:\n"
        "    try:\n"
        "        print('LEAKED', path, len(open(path).read()))\n"
        "    except OSError as e:\n"
        "        print('denied', path, type(e).__name__)\n"
        f"print('home', sorted(os.listdir({str(Path.home())!r})) if os.path.isdir({str(Path.home())!r}) else [])\n"
        "for path in ('/usr/planted', '/etc/planted'):\n"
        "    try:\n"
        "        open(path, 'w')\n"
        "        print('WROTE', path)\n"
        "    except OSError as e:\n"
        "        print('denied', path, type(e).__name__)\n"
    )
    result = run(["python3", "main.py", *paths], files={"main.py": code})
    assert result.ok, result
    assert "LEAKED" not in result.stdout and "WROTE" not in result.stdout
    assert result.stdout.count("denied") == len(paths) + 2
    home = next(line for line in result.stdout.splitlines() if line.startswith("home"))
    prefix = Path(os.path.realpath(sys.base_prefix))
    visible = {prefix.relative_to(Path.home()).parts[0]} if prefix.is_relative_to(Path.home()) else set()
    assert set(eval(home.split(" ", 1)[1])) <= visible  # at most the way to the Python installation
    control = run(["python3", "main.py", *paths[:3]], files={"main.py": code}, isolation="none")
    assert control.stdout.count("LEAKED") == 3  # the same code reads them all without isolation


def _connect_code(port: int) -> str:
    return (
        "import socket\n"
        "try:\n"
        f"    socket.create_connection(('127.0.0.1', {port}), timeout=3).sendall(b'hello')\n"
        "    print('connected')\n"
        "except OSError as e:\n"
        "    print('no network', type(e).__name__)\n"
    )


def test_cannot_connect_to_a_local_server() -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        isolated = run(_connect_code(port))
        assert isolated.ok and isolated.stdout.startswith("no network")
        open_door = run(_connect_code(port), isolation="none")  # the same code does connect without isolation
        assert open_door.stdout == "connected\n"


def test_the_directory_is_thrown_away() -> None:
    first = run("open('left.txt', 'w').write('x')\nimport os\nprint(sorted(os.listdir('.')))")
    assert first.ok and first.stdout == "['left.txt', 'main.py']\n"
    assert first.workdir and not Path(first.workdir).exists()
    second = run("import os\nprint(sorted(os.listdir('.')), os.path.exists('/tmp/left.txt'))")
    assert second.stdout == "['main.py'] False\n"


def test_a_cancelled_run_leaves_nothing_running() -> None:
    marker = f"sandbox-test-{uuid.uuid4().hex}"

    async def go() -> list[int]:
        program = ["python3", "-c", "import time\ntime.sleep(600)", marker]
        task = asyncio.create_task(Sandbox(FAST).run(program))
        for _ in range(100):
            await asyncio.sleep(0.1)
            if processes_with(marker):
                break
        running = processes_with(marker)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, 60)  # the cancel kills it (not: waits for the program)
        return running

    assert asyncio.run(go())  # it did run
    assert processes_with(marker) == []


def test_weaker_isolation_must_be_asked_for_and_keeps_the_limits(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="isolation"):
        Sandbox(isolation="off")  # type: ignore[arg-type]
    monkeypatch.setenv("SAFACTORY_TEST_SECRET", "hunter2")
    plain = run("import os\nprint(os.environ.get('SAFACTORY_TEST_SECRET'))", isolation="none")
    assert plain.ok and plain.stdout == "None\n" and not Path(plain.workdir).exists()
    assert run("while True:\n    pass", Limits(cpu_s=1, wall_s=30), isolation="none").killed_by == "cpu"


def test_missing_isolation_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no `unshare` to be found
    problem = sandbox.namespace_problem.__wrapped__()
    assert problem is not None and "unshare" in problem
    monkeypatch.setattr(sandbox, "namespace_problem", lambda: problem)
    with pytest.raises(SandboxUnavailable, match="unshare.*isolation='none'"):
        Sandbox()
    assert Sandbox(isolation="none").isolation == "none"


def test_bad_file_names_are_refused() -> None:
    for name in ("../escape.txt", "/etc/planted", ""):
        with pytest.raises(ValueError):
            run("pass", files={name: "x"})


PYTHON_TOOL = ToolSpec(
    name="python",
    description="Run Python code; its output comes back.",
    parameters={"type": "object", "properties": {"code": {"type": "string"}}, "required": ["code"]},
)


class PythonToolEnv(ToolEnvironment):
    """How an environment uses the sandbox: one tool call, one sandboxed run, the result as text."""

    spec = EnvSpec(id="python-tool", version="1", tools=(PYTHON_TOOL,), max_turns=3)

    def __init__(self) -> None:
        super().__init__()
        self.sandbox = Sandbox(Limits(cpu_s=1, wall_s=10))

    async def on_reset(self, task: Task) -> list[Message]:
        return [Message(role="user", content=task.prompt)]

    async def tool_python(self, code: str) -> str:
        result = await self.sandbox.run(code)
        if result.ok and result.stdout.strip() == str(self.task.data["answer"] if self.task else ""):
            self.finish(1.0, {"success": True})
        return result.observation()


def test_a_tool_environment_answers_with_the_sandbox_result() -> None:
    def call(code: str) -> Message:
        calls = [ToolCall(id="c", name="python", arguments={"code": code})]
        return Message(role="assistant", content="", tool_calls=calls)

    async def go() -> list[Any]:
        env = PythonToolEnv()
        task = Task(id="t", env_id="python-tool", split="test", prompt="Print 6*7.", data={"answer": 42})
        await env.reset(task, 0)
        runaway = await env.step(call("while True:\n    pass"))
        solved = await env.step(call("print(6 * 7)"))
        return [runaway, solved]

    runaway, solved = asyncio.run(go())
    assert not runaway.terminated and "killed: CPU time limit exceeded" in runaway.messages[0].content
    assert solved.terminated and solved.reward == 1.0 and "42" in solved.messages[0].content
