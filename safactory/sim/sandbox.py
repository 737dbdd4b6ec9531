"""A sandbox for environments that run untrusted code or commands: limits, no network, a throwaway directory.

`await Sandbox(Limits(...)).run(code_or_argv, stdin=..., files={...})` runs a Python program (a string)
or a command (a list) and always answers with a `SandboxResult` for whatever the program does: an
endless loop, a memory or disk hog, a fork bomb, megabytes of output, a crash. Only a sandbox that
cannot be set up raises (`SandboxError`). An environment's tool handler turns the result into an
observation (`SandboxResult.observation()`).

Isolation (`isolation="namespaces"`, the default) comes from Linux namespaces through util-linux's
`unshare` (no other package): a new network namespace (only a loopback that is down: nothing to
connect to), mount, pid, IPC and UTS namespaces, and as non-root a user namespace. Inside,
`sandbox_init.py` builds a root of its own (tmpfs of `disk_bytes` with read-only binds of `/usr`,
`/lib*` and the Python installation only) and pivots into it, so the host's files, the repository,
`/etc/shadow` and the caller's home cannot be opened; the program runs as a uid of its own without
capabilities, and everything it started dies when it ends. `Sandbox()` checks once per process that
this works here and raises `SandboxUnavailable` with the reason when it does not.
`isolation="none"` is the weaker mode that must be asked for by name: the same resource limits, a
fresh directory and a minimal environment, but the host's files and network stay reachable, and
`RLIMIT_NPROC` does not bind root.

Limits: `RLIMIT_CPU` (soft, then SIGKILL a second later), `RLIMIT_AS`, `RLIMIT_FSIZE`, `RLIMIT_NPROC`,
`RLIMIT_NOFILE` and `RLIMIT_CORE=0`, set in the child just before exec; the wall clock is the parent's,
which kills the whole process group (and with it the pid namespace). Output beyond `output_bytes` per
stream is cut; a stream past `output_kill_bytes` gets the program killed. The environment of the
program holds only PATH, HOME, TMPDIR, LANG and what the caller passes; nothing is inherited.
"""

from __future__ import annotations

import asyncio
import functools
import json
import math
import os
import resource
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Literal

from safactory.sim.sandbox_init import full_file

KilledBy = Literal["cpu", "memory", "wall", "file_size", "output"]
Isolation = Literal["namespaces", "none"]
WORKDIR = "/home/sandbox"  # the program's working directory and HOME inside the namespaces
MAIN = "main.py"  # where `run(code)` puts the code
INIT = Path(__file__).with_name("sandbox_init.py")
HOST_TREE = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc/ld.so.cache", "/etc/alternatives")
SANDBOX_UIDS = (2_000_000_000, 2_100_000_000)  # root mode: each run takes a uid of its own from here
MEMORY_SIGNS = ("MemoryError", "Cannot allocate memory", "std::bad_alloc", "out of memory")
KILL_TEXT = {
    "cpu": "CPU time limit exceeded",
    "memory": "memory limit exceeded",
    "wall": "wall-clock time limit exceeded",
    "file_size": "file size limit exceeded",
    "output": "too much output",
}


class SandboxUnavailable(RuntimeError):
    """The requested isolation cannot be set up on this machine (the message says why)."""


class SandboxError(RuntimeError):
    """The sandbox itself failed (not the program in it): e.g. the caller's files do not fit."""


@dataclass(frozen=True)
class Limits:
    """What one run may use. Sizes in bytes, times in seconds."""

    cpu_s: float = 10.0  # CPU time (RLIMIT_CPU, whole seconds, rounded up)
    wall_s: float = 30.0  # wall-clock time, enforced by the parent
    memory_bytes: int = 512 << 20  # address space (RLIMIT_AS) of each process
    file_size_bytes: int = 16 << 20  # largest file a process may write (RLIMIT_FSIZE)
    disk_bytes: int = 64 << 20  # all files written, /tmp included (the tmpfs; namespaces only)
    processes: int = 32  # processes and threads at once (RLIMIT_NPROC)
    open_files: int = 256  # file descriptors per process (RLIMIT_NOFILE)
    output_bytes: int = 64 << 10  # kept of stdout and of stderr each; the rest is cut
    output_kill_bytes: int = 8 << 20  # a stream longer than this gets the program killed

    def rlimits(self) -> list[tuple[str, int, int]]:
        cpu = max(1, math.ceil(self.cpu_s))
        return [
            ("RLIMIT_CPU", cpu, cpu + 1),
            ("RLIMIT_AS", self.memory_bytes, self.memory_bytes),
            ("RLIMIT_FSIZE", self.file_size_bytes, self.file_size_bytes),
            ("RLIMIT_NPROC", self.processes, self.processes),
            ("RLIMIT_NOFILE", self.open_files, self.open_files),
            ("RLIMIT_CORE", 0, 0),
        ]


@dataclass(frozen=True)
class SandboxResult:
    """What a program did. `exit_code` is negative for a signal (-9: killed); `killed_by` names the
    limit that ended it, or None. `workdir` is the host directory the run used (gone by now)."""

    stdout: str
    stderr: str
    exit_code: int
    killed_by: KilledBy | None
    duration_s: float
    truncated: bool = False
    workdir: str = ""

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and self.killed_by is None

    def observation(self, max_chars: int = 4000) -> str:
        """The result as text for a tool message: how it ended, then the output (tails when long)."""
        lines = [f"killed: {KILL_TEXT[self.killed_by]}"] if self.killed_by else []
        lines.append(f"exit code: {self.exit_code}")
        for name, text in (("stdout", self.stdout), ("stderr", self.stderr)):
            if text:
                cut = text if len(text) <= max_chars else "[...]" + text[-max_chars:]
                lines.append(f"{name}:\n{cut}")
        return "\n".join(lines)


@functools.cache
def namespace_problem() -> str | None:
    """Why namespace isolation does not work here (None when it does); checked once per process by
    running an empty program through the whole setup."""
    if sys.platform != "linux":
        return f"namespace isolation needs Linux (this is {sys.platform})"
    if shutil.which("unshare") is None:
        return "`unshare` (util-linux) is not installed"
    tmp = Path(tempfile.mkdtemp(prefix="safactory-sandbox-probe-"))
    read_fd, write_fd = os.pipe()
    try:
        cfg_path = _write_config(tmp, ["true"], {"PATH": "/usr/bin:/bin"}, Limits(), _python(None), ())
        proc = subprocess.run(
            [*_command(cfg_path), str(write_fd)], pass_fds=(write_fd,), capture_output=True, timeout=60, env=_bare_env()
        )
        os.close(write_fd)
        write_fd = -1
        report = _read_report(read_fd)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"starting the sandbox failed: {exc}"
    finally:
        for fd in (read_fd, write_fd):
            if fd >= 0:
                os.close(fd)
        shutil.rmtree(tmp, ignore_errors=True)
    if report.get("status") != 0:
        stderr = proc.stderr.decode(errors="replace").strip()
        return f"namespace setup failed: {report.get('error') or stderr or f'exit {proc.returncode}'}"
    return None


class Sandbox:
    """Runs programs under `limits`. `isolation="none"` (limits only, no file or network isolation)
    must be asked for explicitly; `python` is the interpreter for code (default: this one's base
    installation), `read_only` more host paths to show inside, read-only (e.g. a virtualenv)."""

    def __init__(
        self,
        limits: Limits | None = None,
        *,
        isolation: Isolation = "namespaces",
        python: str | None = None,
        read_only: Sequence[str] = (),
    ) -> None:
        if isolation not in ("namespaces", "none"):
            raise ValueError(f"isolation must be 'namespaces' or 'none', not {isolation!r}")
        if isolation == "namespaces" and (problem := namespace_problem()) is not None:
            raise SandboxUnavailable(f"{problem}; isolation='none' runs without file and network isolation")
        self.limits = limits or Limits()
        self.isolation = isolation
        self.python = _python(python)
        self.read_only = tuple(os.path.realpath(p) for p in read_only)

    async def run(
        self,
        program: str | Sequence[str],
        *,
        stdin: str | bytes | None = None,
        files: Mapping[str, str | bytes] | None = None,
        env: Mapping[str, str] | None = None,
    ) -> SandboxResult:
        """Run Python code (a string, saved as `main.py`) or a command (argv) in a fresh directory
        holding `files` (relative paths), with `stdin` and only `env` added to a minimal environment."""
        files = dict(files or {})
        if isinstance(program, str):
            if MAIN in files:
                raise ValueError(f"files may not hold {MAIN!r} when running code")
            files[MAIN] = program
            argv = [self.python, "-B", MAIN]
        else:
            argv = [str(a) for a in program]
            if not argv:
                raise ValueError("empty command")
        tmp = Path(tempfile.mkdtemp(prefix="safactory-sandbox-"))
        try:
            isolated = self.isolation == "namespaces"
            stage = tmp / ("in" if isolated else "work")
            _stage_files(stage, files)
            home = WORKDIR if isolated else str(stage)
            path = f"{os.path.dirname(self.python)}:/usr/local/bin:/usr/bin:/bin"
            base_env = {"PATH": path, "HOME": home, "TMPDIR": "/tmp" if isolated else home, "LANG": "C.UTF-8"}
            full_env = {**base_env, **dict(env or {})}
            data = stdin.encode() if isinstance(stdin, str) else stdin
            if isolated:
                cfg = _write_config(tmp, argv, full_env, self.limits, self.python, self.read_only)
                return await self._supervise(tmp, _command(cfg), _bare_env(), data, None)
            return await self._supervise(tmp, argv, full_env, data, stage)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    async def _supervise(
        self, tmp: Path, cmd: list[str], env: dict[str, str], stdin: bytes | None, workdir: Path | None
    ) -> SandboxResult:
        """Start `cmd` in a session of its own, drain it, enforce wall time and output size. `workdir`
        is None for namespaces (then a status pipe carries sandbox_init.py's report)."""
        limits = self.limits
        isolated = workdir is None
        (tmp / "stdin").write_bytes(stdin or b"")  # a file, not a pipe: nothing to feed or to block on
        loop = asyncio.get_running_loop()
        captures = [_Capture(limits.output_bytes, limits.output_kill_bytes) for _ in range(2)]  # stdout, stderr
        captures += [_Capture(1 << 16, None)] if isolated else []  # the status report
        transports: list[asyncio.BaseTransport] = []
        write_fds: list[int] = []
        killed: list[KilledBy] = []
        started = time.monotonic()
        try:
            for capture in captures:
                read_fd, write_fd = os.pipe()
                write_fds.append(write_fd)
                reader = asyncio.StreamReader()
                pipe = os.fdopen(read_fd, "rb", buffering=0)
                try:
                    transport, _ = await loop.connect_read_pipe(lambda r=reader: asyncio.StreamReaderProtocol(r), pipe)
                except BaseException:
                    pipe.close()
                    raise
                transports.append(transport)
                capture.reader = reader
            with open(tmp / "stdin", "rb") as stdin_file:
                proc = await asyncio.create_subprocess_exec(
                    *cmd,
                    *([str(write_fds[2])] if isolated else []),
                    stdin=stdin_file,
                    stdout=write_fds[0],
                    stderr=write_fds[1],
                    env=env,
                    cwd=workdir,
                    start_new_session=True,
                    pass_fds=write_fds[2:],
                    preexec_fn=None if isolated else functools.partial(_set_limits, limits),
                )
        except BaseException as exc:
            for transport in transports:
                transport.close()
            if isinstance(exc, OSError):
                raise SandboxError(f"cannot start the sandbox: {exc}") from exc
            raise
        finally:
            _close(*write_fds)

        def kill(reason: KilledBy) -> None:
            if not killed:
                killed.append(reason)
            _kill(proc.pid, isolated)

        tasks = [asyncio.create_task(c.drain(kill)) for c in captures]
        try:
            try:
                await asyncio.wait_for(asyncio.shield(proc.wait()), limits.wall_s)
            except TimeoutError:
                kill("wall")
            if not isolated:
                _killpg(proc.pid)  # no pid namespace here: end what the program left in its group
            await asyncio.wait(tasks, timeout=5.0)  # until every process holding a pipe is gone
        finally:
            if proc.returncode is None:  # also when the caller cancelled us: never leave it running
                _kill(proc.pid, isolated)
            returncode = await asyncio.shield(proc.wait())
            for task in tasks:
                task.cancel()
            for transport in transports:
                transport.close()
        out, err = captures[0], captures[1]
        report = captures[2].report() if isolated else {}
        if killed:
            exit_code = -signal.SIGKILL if isolated else returncode
        elif not isolated:
            exit_code = returncode
        elif "status" in report:
            exit_code = os.waitstatus_to_exitcode(report["status"])
        else:
            why = report.get("error") or f"no report (exit {returncode}): {bytes(err.kept[-500:])!r}"
            raise SandboxError(f"sandbox setup failed: {why}")
        stderr = err.text()
        full = (
            report.get("full_files", False) if workdir is None else full_file((str(workdir),), limits.file_size_bytes)
        )
        return SandboxResult(
            stdout=out.text(),
            stderr=stderr,
            exit_code=exit_code,
            killed_by=killed[0] if killed else _cause(exit_code, report.get("cpu_s"), full, stderr, limits),
            duration_s=time.monotonic() - started,
            truncated=out.cut or err.cut,
            workdir=str(tmp),
        )


class _Capture:
    """One pipe read to its end: the first `keep` bytes kept, the rest counted; past `kill_at`, the
    program is killed."""

    def __init__(self, keep: int, kill_at: int | None) -> None:
        self.keep = keep
        self.kill_at = kill_at
        self.reader: asyncio.StreamReader | None = None
        self.kept = bytearray()
        self.total = 0

    @property
    def cut(self) -> bool:
        return self.total > len(self.kept)

    def text(self) -> str:
        return self.kept.decode(errors="replace")

    def report(self) -> dict[str, Any]:
        try:
            report = json.loads(self.kept or b"{}")
        except ValueError:
            return {}
        return report if isinstance(report, dict) else {}

    async def drain(self, kill: Callable[[KilledBy], None]) -> None:
        assert self.reader is not None
        while chunk := await self.reader.read(1 << 16):
            self.total += len(chunk)
            if len(self.kept) < self.keep:
                self.kept += chunk[: self.keep - len(self.kept)]
            if self.kill_at is not None and self.total > self.kill_at:
                kill("output")
                return


def _cause(exit_code: int, cpu_s: float | None, full_file: bool, stderr: str, limits: Limits) -> KilledBy | None:
    """Which limit ended a program that ended by itself or by a signal of its own limits. `cpu_s` is
    its CPU time (None without namespaces: then a SIGKILL is taken for the hard CPU limit)."""
    if exit_code == 0:
        return None
    sig = -exit_code if exit_code < 0 else 0
    over_cpu = cpu_s is not None and cpu_s >= max(1, math.ceil(limits.cpu_s))
    if sig == signal.SIGXCPU or over_cpu or (sig == signal.SIGKILL and cpu_s is None):
        return "cpu"
    if sig == signal.SIGXFSZ or full_file:
        return "file_size"
    if any(sign in stderr[-2000:] for sign in MEMORY_SIGNS):
        return "memory"
    return None


def _set_limits(limits: Limits) -> None:
    """isolation='none': the limits, in the child before exec."""
    for name, soft, hard in limits.rlimits():
        resource.setrlimit(getattr(resource, name), (soft, hard))


def _python(python: str | None) -> str:
    return os.path.realpath(python or sys.executable)


def _bare_env() -> dict[str, str]:
    return {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}


def _command(cfg_path: Path) -> list[str]:
    """`unshare` into fresh namespaces, then `sandbox_init.py` as pid 1 (its status fd goes last)."""
    spaces = ["--net", "--mount", "--pid", "--ipc", "--uts", "--fork", "--kill-child"]
    if os.geteuid() != 0:
        spaces += ["--user", "--map-root-user"]
    python = os.path.realpath(sys.executable)
    return ["unshare", *spaces, "--", python, "-I", "-S", str(INIT), str(cfg_path)]


def _write_config(
    tmp: Path, argv: list[str], env: dict[str, str], limits: Limits, python: str, read_only: Sequence[str]
) -> Path:
    """What sandbox_init.py needs, in a file of the run's private directory (not on a command line)."""
    (tmp / "root").mkdir(exist_ok=True)
    (tmp / "in").mkdir(exist_ok=True)
    binds: list[list[str]] = []
    links: list[list[str]] = []
    for top in HOST_TREE:
        if os.path.islink(top) and "/" not in top.strip("/"):
            links.append([os.readlink(top), top])
        elif os.path.exists(top):
            binds.append([top, top])
    prefix = os.path.realpath(sys.base_prefix)
    for path in (prefix, os.path.dirname(os.path.dirname(python)), *read_only):
        if not any(path == b or path.startswith(b.rstrip("/") + "/") for b, _ in binds):
            binds.append([path, path])
    root_mode = os.geteuid() == 0
    ident = secrets.randbelow(SANDBOX_UIDS[1] - SANDBOX_UIDS[0]) + SANDBOX_UIDS[0] if root_mode else 0
    cfg = {
        "mode": "root" if root_mode else "userns",
        "root": str(tmp / "root"),
        "staging": str(tmp / "in"),
        "binds": binds,
        "symlinks": links,
        "uid": ident,
        "gid": ident,
        "workdir": WORKDIR,
        "disk_bytes": limits.disk_bytes,
        "file_size_bytes": limits.file_size_bytes,
        "rlimits": limits.rlimits(),
        "argv": argv,
        "env": env,
    }
    path = tmp / "config.json"
    path.write_text(json.dumps(cfg))
    return path


def _stage_files(stage: Path, files: Mapping[str, str | bytes]) -> None:
    """Write the caller's files below `stage`; names must be relative and stay inside."""
    stage.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        rel = PurePosixPath(name)
        if not name or rel.is_absolute() or ".." in rel.parts or rel == PurePosixPath("."):
            raise ValueError(f"sandbox file names must be relative paths inside the directory: {name!r}")
        target = stage / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(content.encode() if isinstance(content, str) else content)


def _read_report(fd: int) -> dict[str, Any]:
    chunks = []
    while chunk := os.read(fd, 1 << 16):
        chunks.append(chunk)
    try:
        report = json.loads(b"".join(chunks) or b"{}")
    except ValueError:
        return {}
    return report if isinstance(report, dict) else {}


def _kill(pid: int, isolated: bool) -> None:
    """End a run. With namespaces, kill only `unshare`'s child (pid 1 of the namespace): the kernel
    kills and reaps everything in the namespace before that child is gone, and `unshare` exits only
    after it, so a finished wait on `unshare` means nothing of the program is left. Otherwise (or
    before the child exists) kill the process group."""
    if isolated:
        try:
            children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        except OSError:
            children = []
        for child in children:
            try:
                os.kill(int(child), signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        if children:
            return
    _killpg(pid)


def _killpg(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _close(*fds: int) -> None:
    for fd in fds:
        if fd >= 0:
            try:
                os.close(fd)
            except OSError:
                pass
