"""Run untrusted code against tests in a sandbox: the code reward (DeepSeek-R1 §2.2.2 checks code with
test cases; the policy's programs are untrusted and RL learns to exploit any weak check).

    result = run_tests("def add(a, b):\\n    return a + b", ["assert add(1, 2) == 3", "assert add(0, 0) == 0"])
    result.reward      # share of tests passed: 1.0

One check is one subprocess (the trusted harness ``_HARNESS``) in its own new session. Before the
program runs, the harness, started as root, enters a new network namespace (only a loopback that is
down: no network) and a new mount namespace in which every mount is read-only and /tmp, /var/tmp,
/dev/shm, /run/lock, /root and /home are small private tmpfs (nothing on the host can be written or
any home read), then drops to an unprivileged uid of its own (one per concurrency slot, no groups)
and sets CPU-time, address-space, file-size, open-file and process-count limits (RLIMIT_NPROC only
binds non-root users, hence the uid drop). The parent kills the whole process group at the wall-clock
deadline and then every process of the slot's uid, so daemons that left the group die too; the
private mounts vanish with the namespace. Not root: the same limits apply under the caller's own
uid (RLIMIT_NPROC then counts all of that user's processes), the network is cut with a user + network namespace where the kernel allows unprivileged ones
and left on where it does not, nothing else is isolated, and the caller's other processes can be
signalled: run untrusted code as root (or in a container) for the full sandbox.

Cheats score 0: the harness writes one record per test that passed, prefixed by a random nonce the
program never sees on disk (the harness deletes its job file first), argv or environment, to a pipe the
parent reads with a byte cap; exiting early, killing the harness, printing fake results or raising
``SystemExit`` therefore earn nothing for the tests that did not run. The limit: the nonce lives in the
harness's memory, so a program that searches the interpreter's frames for it (or for a test's globals)
could still forge results (RL policies are not known to find this; the process limits hold regardless).
``==`` and ``!=`` in the tests are compared strictly (``strict_eq`` in the harness): against a plain
expected value (number, string, bytes, None, list / tuple / dict of them) the result must be a plain
value too, so an object whose ``__eq__`` always returns True (the "always equal" hack) fails; each test
runs in its own copy of the program's globals, which the program's functions cannot rebind.
"""
from __future__ import annotations

import json
import os
import queue
import secrets
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass

# Sandbox uids: a block far above any real account, picked per parent process so two trainers on one
# machine do not share (and kill) each other's slots.
_UID_BASE = 1_500_000_000 + (os.getpid() % 100_000) * 64
MAX_SLOTS = 64
# Where unprivileged code could write, or read a user's files, on a usual Linux host.
PRIVATE_DIRS = ("/tmp", "/var/tmp", "/dev/shm", "/run/lock", "/root", "/home")


@dataclass(frozen=True)
class Limits:
    """Resource limits of one check."""

    timeout: float = 10.0
    """Wall-clock seconds for the whole check (startup, program and tests)."""
    cpu_seconds: int = 5
    """RLIMIT_CPU of each process."""
    memory_mb: int = 1024
    """RLIMIT_AS (address space) of each process."""
    file_mb: int = 16
    """RLIMIT_FSIZE (largest file written) and the size of each private tmpfs."""
    processes: int = 32
    """RLIMIT_NPROC: processes (threads) of the sandbox uid."""
    open_files: int = 64
    """RLIMIT_NOFILE."""
    report_bytes: int = 65536
    """Bytes of the result pipe the parent keeps (the rest is read and dropped)."""


@dataclass(frozen=True)
class CheckResult:
    """``passed`` of ``total`` tests; ``status``: ok | timeout | error (the harness could not run)."""

    passed: int
    total: int
    status: str

    @property
    def reward(self) -> float:
        return self.passed / self.total if self.total else 0.0


# The trusted harness, run as `python -I -c _HARNESS JOB_FILE REPORT_FD`. Everything it needs is bound
# before the program runs, in locals of main(), so the program cannot patch it through __main__.
_HARNESS = r"""
import ast, builtins, ctypes, json, numbers, os, resource, sys
def main():
    path, fd = sys.argv[1], int(sys.argv[2])
    with open(path) as f:
        job = json.load(f)
    os.remove(path)
    nonce, lim, uid = job["nonce"], job["limits"], job["uid"]
    def isolate():  # namespaces, uid, limits, working directory
        if uid is not None:
            libc = ctypes.CDLL(None, use_errno=True)
            def check(rc, what):
                if rc != 0:
                    raise OSError(ctypes.get_errno(), what)
            check(libc.unshare(0x40000000 | 0x00020000), "unshare(CLONE_NEWNET | CLONE_NEWNS)")
            check(libc.mount(None, b"/", None, 0x4000 | 0x40000, None), "mount --make-rprivate /")
            with open("/proc/self/mountinfo") as f:
                points = [line.split()[4] for line in f]
            for point in points:  # MS_REMOUNT | MS_BIND | MS_RDONLY: read-only in this namespace only
                libc.mount(None, point.encode(), None, 0x20 | 0x1000 | 0x1, None)
            # The interpreter may live under a private dir (pyenv in /root): bind it back, read-only.
            prefixes = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix}
            keep = {p: os.open(p, os.O_PATH) for p in prefixes if any(p.startswith(d + "/") for d in job["private_dirs"])}
            opts = f"size={lim['file_mb']}m,mode=1777".encode()
            for d in job["private_dirs"]:  # MS_NOSUID | MS_NODEV
                check(libc.mount(b"tmpfs", d.encode(), b"tmpfs", 0x2 | 0x4, opts), "mount tmpfs " + d)
            for p, pfd in keep.items():  # MS_BIND | MS_REC, then MS_REMOUNT | MS_BIND | MS_RDONLY
                os.makedirs(p, exist_ok=True)
                check(libc.mount(f"/proc/self/fd/{pfd}".encode(), p.encode(), None, 0x1000 | 0x4000, None), "bind " + p)
                check(libc.mount(None, p.encode(), None, 0x20 | 0x1000 | 0x1, None), "remount " + p)
                os.close(pfd)
            work = "/tmp/work"
            os.mkdir(work, 0o700)
            os.chown(work, uid, uid)
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
        else:
            work = job["work"]
            libc = ctypes.CDLL(None, use_errno=True)
            libc.unshare(0x10000000 | 0x40000000)  # CLONE_NEWUSER | CLONE_NEWNET where allowed
        for res, value in ((resource.RLIMIT_CPU, lim["cpu_seconds"]), (resource.RLIMIT_AS, lim["memory_mb"] << 20),
                           (resource.RLIMIT_FSIZE, lim["file_mb"] << 20), (resource.RLIMIT_NOFILE, lim["open_files"]),
                           (resource.RLIMIT_NPROC, lim["processes"]), (resource.RLIMIT_CORE, 0)):
            resource.setrlimit(res, (value, value))
        os.chdir(work)
        os.environ.clear()
        os.environ.update(HOME=work, TMPDIR=work, PATH="/usr/bin:/bin", LANG="C.UTF-8")
    try:
        isolate()
    except BaseException as e:  # reported, so a host that cannot sandbox fails loudly, not with 0 rewards
        os.write(fd, f"{nonce} error {type(e).__name__}: {e}".replace("\n", " ").encode() + b"\n")
        return
    write, encode, run, BaseExc = os.write, str.encode, builtins.exec, BaseException
    _type, _isinstance, _len, _zip, _all, _complex, _dict = type, isinstance, len, zip, all, complex, dict
    Number, plain_numbers, plain_values = numbers.Number, (bool, int, float, complex), (str, bytes, type(None))
    def strict_eq(a, b):  # `==` in tests: a plain expected value is compared as a plain value, so a
        for x, y in ((a, b), (b, a)):  # result whose __eq__ always says True cannot pass
            t = _type(y)
            if t in plain_numbers:
                return _isinstance(x, Number) and (x if _type(x) in plain_numbers else _complex(x)) == y
            if t in plain_values:
                return _type(x) is t and x == y
            if t in (list, tuple, _dict):
                if _type(x) is not t or _len(x) != _len(y):
                    return False
                if t is _dict:
                    return _all(k in x and strict_eq(x[k], y[k]) for k in y)
                return _all(strict_eq(p, q) for p, q in _zip(x, y))
        return a == b
    def prepare(i, test):  # a test that does not compile fails alone
        try:
            return compile(ast.fix_missing_locations(Strict().visit(ast.parse(test))), f"<test {i}>", "exec")
        except BaseExc:
            return None
    tests = [prepare(i, test) for i, test in enumerate(job["tests"])]
    ns = {"__name__": "__main__", "__builtins__": builtins}
    write(fd, encode(f"{nonce} ready\n"))
    try:
        run(compile(job["program"], "<program>", "exec"), ns)
    except BaseExc:
        return
    for i, test in enumerate(tests):
        if test is None:
            continue
        try:  # each test in its own copy of the globals, out of reach of the program's functions
            run(test, _dict(ns, __strict_eq__=strict_eq))
        except BaseExc:
            continue
        write(fd, encode(f"{nonce} {i}\n"))
class Strict(ast.NodeTransformer):
    def visit_Compare(self, node):
        self.generic_visit(node)
        if len(node.ops) != 1 or not isinstance(node.ops[0], (ast.Eq, ast.NotEq)):
            return node
        call = ast.Call(ast.Name("__strict_eq__", ast.Load()), [node.left, node.comparators[0]], [])
        return ast.copy_location(call if isinstance(node.ops[0], ast.Eq) else ast.UnaryOp(ast.Not(), call), node)
main()
"""

_slots: queue.Queue[int] = queue.Queue()
for _slot in range(MAX_SLOTS):
    _slots.put(_slot)


def _isolated() -> bool:
    return os.geteuid() == 0 and sys.platform == "linux"


def _kill_uid(uid: int) -> None:
    """SIGKILL every process of ``uid``: kill(-1) sent as that uid reaches exactly its processes, and the
    kernel makes it atomic with respect to fork, so a fork bomb cannot outrun it. /bin/sh, because the
    sandbox uid may not be allowed to execute this interpreter (a venv under /root)."""
    subprocess.run(["/bin/sh", "-c", "kill -9 -1"], user=uid, group=uid,
                   extra_groups=[], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL, timeout=30, check=False)


def live_processes(uids: range) -> list[int]:
    """Pids of the live (not zombie) processes whose uid is in ``uids`` (Linux /proc)."""
    found = []
    for entry in os.scandir("/proc"):
        try:
            if entry.name.isdigit() and entry.stat().st_uid in uids:
                with open(os.path.join(entry.path, "stat"), "rb") as f:
                    if f.read().rpartition(b")")[2].split()[0] != b"Z":
                        found.append(int(entry.name))
        except (OSError, IndexError):  # the process ended while we looked
            continue
    return found


def _kill_uid_and_wait(uid: int, patience_s: float = 5.0) -> None:
    """Kill every process of ``uid`` and wait until none runs (SIGKILL lands asynchronously)."""
    deadline = time.monotonic() + patience_s
    _kill_uid(uid)
    while live_processes(range(uid, uid + 1)):
        if time.monotonic() > deadline:
            raise RuntimeError(f"processes of sandbox uid {uid} survived SIGKILL")
        time.sleep(0.01)
        _kill_uid(uid)


def _read_report(proc: subprocess.Popen, fd: int, deadline: float, cap: int) -> tuple[bytes, bool]:
    """Bytes from the report pipe (first ``cap`` kept) until the harness exits or the deadline; and
    whether the deadline passed. Reading stops at the harness's exit even if descendants hold the pipe."""
    data, timed_out, exited = bytearray(), False, False
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            timed_out = True
            break
        # Once the harness has exited, drain what it wrote without waiting: its last records may have
        # landed between a select that timed out and the poll that saw the exit.
        ready, _, _ = select.select([fd], [], [], 0 if exited else min(left, 0.05))
        if ready:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            data += chunk[: max(0, cap - len(data))]
        elif exited:
            break
        else:
            exited = proc.poll() is not None
    return bytes(data), timed_out


def run_tests(program: str, tests: Sequence[str], limits: Limits = Limits()) -> CheckResult:
    """Run ``program`` then each test (Python source; a test passes when it runs without raising) in
    a sandbox. Never raises for anything the program does; returns within ``limits.timeout`` plus
    cleanup once a slot is free (at most ``MAX_SLOTS`` checks run at once)."""
    tests = list(tests)
    if not tests:
        return CheckResult(0, 0, "ok")
    slot = _slots.get()
    uid = _UID_BASE + slot if _isolated() else None
    nonce = secrets.token_hex(16)
    tmp = tempfile.mkdtemp(prefix="nanoseek-sandbox-")
    read_fd, write_fd = os.pipe()
    proc = None
    try:
        job = os.path.join(tmp, "job.json")
        with open(os.open(job, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as f:
            json.dump({"nonce": nonce, "limits": asdict(limits), "uid": uid, "work": tmp,
                       "private_dirs": [d for d in PRIVATE_DIRS if os.path.isdir(d)],
                       "program": program, "tests": tests}, f)
        proc = subprocess.Popen(
            [sys.executable, "-I", "-c", _HARNESS, job, str(write_fd)], pass_fds=(write_fd,), cwd=tmp,
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}, start_new_session=True,
        )
        os.close(write_fd)
        write_fd = -1
        report, timed_out = _read_report(proc, read_fd, time.monotonic() + limits.timeout, limits.report_bytes)
        records = {tail for head, _, tail in (line.partition(" ") for line in report.decode(
            "utf-8", errors="replace").splitlines()) if head == nonce}
        if "ready" not in records:
            error = next((r for r in records if r.startswith("error ")), "error the harness did not start")
            return CheckResult(0, len(tests), "timeout" if timed_out else "error: sandbox setup: " + error[6:])
        passed = sum(str(i) in records for i in range(len(tests)))
        return CheckResult(passed, len(tests), "timeout" if timed_out else "ok")
    except Exception as e:  # noqa: BLE001 - an OS failure starting the harness: no credit, no raise
        return CheckResult(0, len(tests), f"error: {type(e).__name__}: {e}")
    finally:
        try:
            if proc is not None:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait()
            if uid is not None:
                _kill_uid_and_wait(uid)
        except Exception as e:  # noqa: BLE001 - never into the trainer, but said: a survivor may hold the uid
            warnings.warn(f"sandbox cleanup failed for uid {uid}: {e}", RuntimeWarning, stacklevel=2)
        for fd in (read_fd, write_fd):
            if fd >= 0:
                os.close(fd)
        shutil.rmtree(tmp, ignore_errors=True)
        _slots.put(slot)


def check_sandbox(limits: Limits = Limits()) -> None:
    """Raise if this host cannot run the sandbox (e.g. root without CAP_SYS_ADMIN, as in Docker's default
    profile), so a code task fails at its start instead of training on rewards that are all 0."""
    result = run_tests("x = 1", ["assert x == 1"], limits)
    if result.reward != 1.0:
        raise RuntimeError(f"the code sandbox does not work here ({result.status}); see nanoseek/tasks/sandbox.py")
