"""The child side of `mocap_common.procs.child_process`: ties a child to its owner's life.

Two roles, both started by the owner with `python -I -S child_shim.py ...` (standard library only,
isolated, no site: it starts in milliseconds and never depends on the owner's import path or on
the command's interpreter):

`exec ALIVE_FD CMD ARGS...` — run in the child's new session, then becomes CMD by exec(), so CMD
keeps this pid, leads its own process group and exits with its own status (the owner sees CMD
itself, as without the shim). Before the exec: on Linux, prctl(PR_SET_PDEATHSIG, SIGKILL), so the
kernel kills CMD the moment the owner's thread that started it ends, however the owner ends
(kill -9 included; it survives exec and needs nothing from CMD); and if the owner is already gone,
CMD never starts (exit 75).

`watch ALIVE_FD PGID MARK` — the owner's own child (so the owner reaps it: no zombie is left
under a container's PID 1 that never reaps), in a session of its own. It blocks reading ALIVE_FD,
the read end of a pipe whose only write end the owner holds; the read returns EOF only when the
owner is gone, and the watcher then SIGKILLs what is left of the child: every process carrying
MARK in its environment, with its process group — CMD's descendants too, which
PR_SET_PDEATHSIG does not reach — or, where there is no /proc, the group PGID. It ignores
SIGTERM/SIGINT/SIGHUP; the owner ends it with SIGKILL once the child's group is gone.

ALIVE_FD is never written: it is readable only at EOF, i.e. once the owner is gone.
"""

from __future__ import annotations

import os
import select
import signal
import sys
import time
from pathlib import Path

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
MARK_ENV = "MOCAP_CHILD_MARK"  # a random token per child, inherited by everything it starts
EXIT_USAGE = 2
EXIT_OWNER_GONE = 75  # EX_TEMPFAIL: the owner died before CMD could start
EXIT_CANNOT_EXECUTE = 126
EXIT_NOT_FOUND = 127


def main(argv: list[str]) -> int:
    if len(argv) >= 4 and argv[1] == "exec":
        return become(int(argv[2]), argv[3:])
    if len(argv) == 5 and argv[1] == "watch":
        return watch(int(argv[2]), int(argv[3]), argv[4])
    print("usage: child_shim.py exec ALIVE_FD CMD [ARGS...] | watch ALIVE_FD PGID MARK", file=sys.stderr)
    return EXIT_USAGE


# --- exec: become the command -------------------------------------------------------------------

def become(alive_fd: int, command: list[str]) -> int:
    _die_with_owner()
    if owner_gone(alive_fd):  # checked after prctl: from here on the kernel covers the owner's death
        return EXIT_OWNER_GONE
    os.close(alive_fd)  # the command has no use for it
    _restore_signals()
    try:
        os.execvp(command[0], command)
    except FileNotFoundError:  # the owner checked the command first: only a race gets here
        print(f"command not found: {command[0]}", file=sys.stderr)
        return EXIT_NOT_FOUND
    except OSError as error:
        print(f"cannot execute {command[0]}: {error.strerror}", file=sys.stderr)
        return EXIT_CANNOT_EXECUTE
    return EXIT_CANNOT_EXECUTE  # not reached: execvp returns only by raising


def _die_with_owner() -> None:
    if not sys.platform.startswith("linux"):
        return  # the watcher alone covers other systems
    import ctypes  # noqa: PLC0415 - Linux only

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        print(f"child_shim: prctl(PR_SET_PDEATHSIG) failed (errno {ctypes.get_errno()}); "
              "relying on the watcher alone", file=sys.stderr)


def owner_gone(alive_fd: int) -> bool:
    readable, _, _ = select.select([alive_fd], [], [], 0)
    return bool(readable)


def _restore_signals() -> None:
    # Python ignores these at start-up and an ignored disposition survives exec: give the command
    # the defaults, as subprocess.Popen(restore_signals=True) does.
    for name in ("SIGPIPE", "SIGXFZ", "SIGXFSZ"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), signal.SIG_DFL)


# --- watch: kill what is left once the owner is gone --------------------------------------------

def watch(alive_fd: int, pgid: int, mark: str) -> int:
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, signal.SIG_IGN)  # meant for the child; the owner ends us with SIGKILL
    while True:
        try:
            if not os.read(alive_fd, 512):
                break  # EOF: the owner is gone
        except OSError:
            break
    if Path("/proc/self").is_dir():
        kill_marked(mark, timeout_s=5.0)
    else:  # no way to check who holds the group now; it was the child's a moment ago
        _kill_group(pgid)
    return 0


def kill_marked(mark: str, timeout_s: float) -> set[int]:
    """SIGKILLs every live process carrying `mark`, with its process group, until none is left
    or `timeout_s` passes; returns the pids it found. A group holding a process that carries the
    mark is the child's: a group id is not reused while any of its members lives."""
    found: set[int] = set()
    deadline = time.monotonic() + timeout_s
    while (marked := marked_processes(mark)) and time.monotonic() < deadline:
        for pid, group in marked:
            found.add(pid)
            _kill_group(group)
            try:
                os.kill(pid, signal.SIGKILL)  # in case it left the group (setsid)
            except (ProcessLookupError, PermissionError):
                pass
        time.sleep(0.05)
    return found


def marked_processes(mark: str) -> list[tuple[int, int]]:
    """(pid, pgid) of every live (not zombie) process of this user whose environment carries
    `mark`; [] where there is no /proc."""
    needle = f"{MARK_ENV}={mark}".encode()
    found = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            if needle not in (entry / "environ").read_bytes().split(b"\0"):
                continue
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # gone meanwhile, or another user's process
        if fields[0] != "Z" and int(entry.name) != os.getpid():
            found.append((int(entry.name), int(fields[2])))
    return found


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


if __name__ == "__main__":
    sys.exit(main(sys.argv))
