"""The sandbox's first process inside its namespaces (pid 1): builds the file tree, runs the program, reports.

`safactory.sim.sandbox` starts this file as a script (`python -I -S sandbox_init.py CONFIG STATUS_FD`)
under `unshare --net --mount --pid --ipc --uts --fork` (plus `--user --map-root-user` when not root),
so it runs as pid 1 of a fresh pid namespace, in a private mount namespace and a network namespace
with nothing but a down loopback. It imports only the standard library. It:

1. mounts a tmpfs (`disk_bytes`) as the new root and bind-mounts read-only (nosuid, nodev) only what
   a program needs to run: `/usr`, the `/lib*` directories, the Python installation, a few files of
   `/etc`; `/dev` gets null, zero, full, random and urandom; a fresh `/proc` of the new pid namespace;
   `/tmp` and the working directory (`/home/sandbox`, with the caller's files copied in) live in the
   tmpfs;
2. `pivot_root`s into it and detaches the old root, so no path leads back to the host's files;
3. forks the program: as root on the host it takes a uid and gid of its own (no capabilities left,
   `RLIMIT_NPROC` then counts only this sandbox's processes); in a user namespace it drops every
   capability from its bounding set; then no-new-privileges, the resource limits, `execvpe` with the
   given environment only;
4. reaps every process until the program ends, writes `{"status", "cpu_s", "full_files"}` (or
   `{"error"}` when the setup failed) to the status pipe and exits, which makes the kernel kill
   whatever the program left.
"""

from __future__ import annotations

import ctypes
import json
import os
import resource
import shutil
import socket
import sys
from typing import Any

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_NOATIME, MS_NODIRATIME, MS_BIND, MS_REC, MS_RELATIME = 32, 1024, 2048, 4096, 16384, 1 << 21
MNT_DETACH = 2
PR_CAPBSET_DROP, PR_SET_DUMPABLE, PR_SET_NO_NEW_PRIVS = 24, 4, 38
PIVOT_ROOT = {"x86_64": 155, "aarch64": 41, "riscv64": 41}  # syscall numbers
DEVICES = ("null", "zero", "full", "random", "urandom")
LIBC = ctypes.CDLL(None, use_errno=True)


def check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def mount(source: str, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    check(
        LIBC.mount(
            source.encode(), target.encode(), fstype.encode() if fstype else None, flags, data and data.encode()
        ),
        f"mount {source} on {target}",
    )


def bind_readonly(source: str, target: str) -> None:
    """Bind `source` at `target` read-only, nosuid and nodev, keeping the flags a user namespace locks."""
    if os.path.isdir(source):
        os.makedirs(target, exist_ok=True)
    else:
        os.makedirs(os.path.dirname(target), exist_ok=True)
        open(target, "a").close()
    mount(source, target, None, MS_BIND | MS_REC)
    kept = os.statvfs(target).f_flag
    flags = MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV
    for st_flag, ms_flag in ((os.ST_NOEXEC, MS_NOEXEC), (os.ST_NOATIME, MS_NOATIME)):
        flags |= ms_flag if kept & st_flag else 0
    flags |= MS_NODIRATIME if kept & os.ST_NODIRATIME else 0
    flags |= MS_RELATIME if kept & os.ST_RELATIME else 0
    mount(source, target, None, flags)


def inside(root: str, path: str) -> str:
    return os.path.join(root, path.lstrip("/"))


def build_tree(cfg: dict[str, Any]) -> None:
    """Everything the program will see, under cfg["root"] (still a host path here)."""
    root = cfg["root"]
    mount("tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV, f"size={cfg['disk_bytes']},mode=0755")
    for source, target in cfg["binds"]:
        bind_readonly(source, inside(root, target))
    for target, link in cfg["symlinks"]:
        os.symlink(target, inside(root, link))
    dev = inside(root, "/dev")
    os.makedirs(dev, exist_ok=True)
    for name in DEVICES:
        open(os.path.join(dev, name), "a").close()
        mount(f"/dev/{name}", os.path.join(dev, name), None, MS_BIND | MS_NOSUID)
    for i, name in enumerate(("stdin", "stdout", "stderr")):
        os.symlink(f"/proc/self/fd/{i}", os.path.join(dev, name))
    os.symlink("/proc/self/fd", os.path.join(dev, "fd"))
    os.makedirs(inside(root, "/proc"))
    mount("proc", inside(root, "/proc"), "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    for shared in ("/tmp", "/dev/shm"):
        os.makedirs(inside(root, shared), exist_ok=True)
        os.chmod(inside(root, shared), 0o1777)
    uid, gid, home = cfg["uid"], cfg["gid"], cfg["workdir"]
    etc = inside(root, "/etc")
    os.makedirs(etc, exist_ok=True)
    for name, text in (
        ("passwd", f"root:x:0:0::/root:/bin/sh\nsandbox:x:{uid}:{gid}::{home}:/bin/sh\n"),
        ("group", f"root:x:0:\nsandbox:x:{gid}:\n"),
        ("hosts", "127.0.0.1 localhost\n::1 localhost\n"),
        ("hostname", "sandbox\n"),
    ):
        if not os.path.exists(os.path.join(etc, name)):
            with open(os.path.join(etc, name), "w") as f:
                f.write(text)
    work = inside(root, home)
    shutil.copytree(cfg["staging"], work, dirs_exist_ok=True)
    for dirpath, dirnames, filenames in os.walk(work):
        for name in [dirpath, *(os.path.join(dirpath, n) for n in dirnames + filenames)]:
            os.lchown(name, uid, gid)


def pivot_into(root: str) -> None:
    """Make `root` the root of this mount namespace and detach the old one."""
    number = PIVOT_ROOT.get(os.uname().machine)
    if number is None:
        raise OSError(f"pivot_root: unknown syscall number on {os.uname().machine}")
    os.chdir(root)
    check(LIBC.syscall(number, b".", b"."), "pivot_root")
    check(LIBC.umount2(b".", MNT_DETACH), "umount old root")
    os.chdir("/")


def become_sandboxed(cfg: dict[str, Any]) -> None:
    """In the forked child, just before exec: no privileges, limits, the working directory."""
    for cap in range(64):  # an empty bounding set: exec grants no capability, even to uid 0 of a user namespace
        if LIBC.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            break
    if cfg["mode"] == "root":
        os.setgroups([])
        os.setresgid(cfg["gid"], cfg["gid"], cfg["gid"])
        os.setresuid(cfg["uid"], cfg["uid"], cfg["uid"])  # a non-zero uid: every capability is gone
    check(LIBC.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")
    for name, soft, hard in cfg["rlimits"]:
        resource.setrlimit(getattr(resource, name), (soft, hard))
    os.chdir(cfg["workdir"])


def run_program(cfg: dict[str, Any]) -> tuple[int, float]:
    """Fork and exec the program; reap everything until it ends. Returns (wait status, its CPU seconds)."""
    pid = os.fork()
    if pid == 0:
        try:
            become_sandboxed(cfg)
            os.execvpe(cfg["argv"][0], cfg["argv"], cfg["env"])
        except BaseException as exc:  # the child must never return into the init's code
            os.write(2, f"sandbox: cannot run {cfg['argv'][0]!r}: {exc}\n".encode(errors="replace"))
        os._exit(127)
    while True:
        try:
            done, status, usage = os.wait4(-1, 0)
        except ChildProcessError:
            raise OSError("the program vanished") from None
        if done == pid:
            return status, usage.ru_utime + usage.ru_stime


def full_file(tops: tuple[str, ...], size: int) -> bool:
    """Whether the program left a file at the size limit (where the kernel stopped its write)."""
    for top in tops:
        for dirpath, _, filenames in os.walk(top):
            for name in filenames:
                try:
                    if os.lstat(os.path.join(dirpath, name)).st_size >= size:
                        return True
                except OSError:
                    continue
    return False


def main() -> None:
    with open(sys.argv[1]) as f:
        cfg = json.load(f)
    status_fd = int(sys.argv[2])
    os.set_inheritable(status_fd, False)
    try:
        LIBC.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)  # the program may share our uid: it must not ptrace us
        build_tree(cfg)
        pivot_into(cfg["root"])
        socket.sethostname("sandbox")
        status, cpu_s = run_program(cfg)
        full = full_file((cfg["workdir"], "/tmp", "/dev/shm"), cfg["file_size_bytes"])
        report: dict[str, Any] = {"status": status, "cpu_s": cpu_s, "full_files": full}
    except Exception as exc:
        report = {"error": f"{type(exc).__name__}: {exc}"}
    os.write(status_fd, json.dumps(report).encode())
    os.close(status_fd)


if __name__ == "__main__":
    main()
