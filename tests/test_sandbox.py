"""The code-reward sandbox (nanoseek.tasks.sandbox) against adversarial programs (issue 17 item 2).

Each case must get the right reward (0 where it cheats), return within its timeout, leave no process
of the sandbox uids and change nothing on the host. The limits are probed with harmless programs
first; the bombs are bounded so that a failed limit still cannot take the machine down (<= 128
processes, <= 1 GB). The isolation cases need root (namespaces, the uid drop) and are skipped without it.
"""
import dataclasses
import os
import secrets
import shutil
import socket
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from nanoseek.tasks import sandbox
from nanoseek.tasks.sandbox import Limits, run_tests

LIMITS = Limits(timeout=4.0, cpu_seconds=2, memory_mb=256, processes=16)
SLACK_S = 3.0  # cleanup and interpreter startup on a loaded 2-core machine
root_only = pytest.mark.skipif(os.geteuid() != 0, reason="namespaces and the uid drop need root")


def sandbox_processes() -> list[int]:
    """Live (non-zombie) processes of any sandbox uid of this test process."""
    return sandbox.live_processes(range(sandbox._UID_BASE, sandbox._UID_BASE + sandbox.MAX_SLOTS))


def sandbox_dirs() -> set[str]:
    return {p for p in os.listdir(tempfile.gettempdir()) if p.startswith("nanoseek-sandbox-")}


def check(program: str, tests: list[str], limits: Limits = LIMITS):
    """Run one check and assert the invariants every case shares; return the result."""
    dirs = sandbox_dirs()
    start = time.monotonic()
    result = run_tests(program, tests, limits)
    assert time.monotonic() - start < limits.timeout + SLACK_S
    assert sandbox_processes() == []
    assert sandbox_dirs() == dirs
    return result


def test_honest_programs_get_the_share_of_tests_passed():
    program = "def add(a, b):\n    return a + b if a != 5 else 0\n"
    result = check(program, ["assert add(1, 2) == 3", "assert add(5, 1) == 6", "assert add(2, 2) == 4",
                             "assert add(0, 0) == 1"])
    assert (result.passed, result.total, result.status, result.reward) == (2, 4, "ok", 0.5)
    assert check("syntax error(", ["assert True"]).reward == 0.0
    assert check("x = 1", ["assert x ==", "assert x == 1"]).passed == 1  # a broken test fails alone
    assert check("import json, fractions\nx = json.dumps([1])", ["assert x == '[1]'"]).reward == 1.0
    assert check("x = 1", []).reward == 0.0


def test_a_sandbox_that_cannot_start_is_reported():
    broken = Limits(processes=-5)  # setrlimit refuses it before the program would run
    result = check("x = 1", ["assert x == 1"], broken)
    assert result.reward == 0.0 and result.status.startswith("error: sandbox setup: ValueError"), result
    with pytest.raises(RuntimeError, match="the code sandbox does not work here"):
        sandbox.check_sandbox(broken)
    sandbox.check_sandbox(LIMITS)


@root_only
def test_limits_are_in_force():
    """Harmless probes: each limit the bombs below rely on is set, and fork stops at the process limit."""
    marker = Path(tempfile.mkdtemp(prefix="nanoseek-host-", dir="/tmp"))
    probes = [
        f"import os; assert os.getuid() >= {sandbox._UID_BASE} and os.getgroups() == []",
        "import resource as r; assert r.getrlimit(r.RLIMIT_NPROC) == (16, 16)",
        "import resource as r; assert r.getrlimit(r.RLIMIT_AS) == (256 << 20, 256 << 20)",
        "import resource as r; assert r.getrlimit(r.RLIMIT_CPU) == (2, 2)",
        "import resource as r; assert r.getrlimit(r.RLIMIT_FSIZE) == (16 << 20, 16 << 20)",
        "import socket; assert [name for _, name in socket.if_nameindex()] == ['lo']",
        # a private /tmp: the host's files there are out of sight (the interpreter may be mounted back into it)
        f"import os; assert os.getcwd() == '/tmp/work' and not os.path.exists({str(marker)!r})",
        # 20 sleeping children at most; the 16-process limit must stop fork first
        "import os, time\nn = 0\ntry:\n    for _ in range(20):\n        if os.fork() == 0:\n"
        "            time.sleep(1)\n            os._exit(0)\n        n += 1\nexcept OSError:\n    pass\nassert n < 16",
    ]
    try:
        result = check("", probes)
    finally:
        marker.rmdir()
    assert result.passed == len(probes), result


def test_infinite_loops_end_at_their_limits():
    assert check("while True:\n    pass", ["assert True"]).reward == 0.0  # CPU time
    result = check("import time\nwhile True:\n    time.sleep(0.1)", ["assert True"])  # wall clock
    assert (result.reward, result.status) == (0.0, "timeout")
    # a test that hangs loses only itself
    result = check("import time\ndef f(x):\n    while x:\n        time.sleep(0.1)\n    return 1",
                   ["assert f(0) == 1", "assert f(1) == 1"])
    assert (result.passed, result.status) == (1, "timeout")


@root_only
def test_fork_bomb():
    # <= 2**7 = 128 processes even without the limit; each would then sleep until the deadline kills it
    program = "import os, time\nfor _ in range(7):\n    try:\n        os.fork()\n    except OSError:\n" \
              "        pass\ntime.sleep(60)"
    result = check(program, ["assert True"])
    assert (result.reward, result.status) == (0.0, "timeout")


@root_only
def test_escaped_daemon_is_killed():
    # a child that leaves the process group (setsid) still dies with the sandbox's uid
    program = "import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(60)\n    os._exit(0)"
    assert check(program, ["assert True"]).reward == 1.0


def test_memory_bomb():
    # <= 20 x 50 MB = 1 GB even without the limit
    program = "blob = []\nfor _ in range(20):\n    blob.append(bytearray(50 << 20))\ndef f():\n    return 1"
    assert check(program, ["assert f() == 1"]).reward == 0.0


def test_large_output_is_dropped():
    program = "import sys\nsys.stdout.write('x' * (100 << 20))\nsys.stderr.write('y' * (10 << 20))\n" \
              "def f():\n    return 1"
    assert check(program, ["assert f() == 1"]).reward == 1.0
    # flooding every open descriptor, the result pipe included, earns nothing (the parent keeps 64 KB)
    flood = "import os\nfor fd in range(3, 64):\n    try:\n        for _ in range(100):\n" \
            "            os.write(fd, b'0 ' * (1 << 19))\n    except OSError:\n        pass\ndef f():\n    return 1"
    assert check(flood, ["assert f() == 1"]).reward == 0.0


@root_only
def test_writing_outside_its_directory():
    shared = Path(tempfile.mkdtemp(dir=Path(__file__).parent))  # world-writable, on the root filesystem
    shared.chmod(0o777)
    name = f"escaped-{secrets.token_hex(4)}"
    targets = [shared / name, Path("/tmp") / name, Path("/var/tmp") / name, Path("/dev/shm") / name]
    try:
        program = "def escaped(path):\n    with open(path, 'w') as f:\n        f.write('x')\n    return True\n"
        assert check(program, [f"assert escaped({str(targets[0])!r})"]).reward == 0.0
        # the private /tmp, /var/tmp and /dev/shm take writes that vanish with the sandbox
        private = [f"assert escaped({str(p)!r})" for p in targets[1:]] + [f"assert escaped('../{name}')"]
        assert check(program, private).reward == 1.0
        assert not any(p.exists() for p in targets)
        assert os.listdir(shared) == []
    finally:
        shutil.rmtree(shared)


@root_only
def test_reading_the_home_directory():
    home = Path(tempfile.mkdtemp(dir=Path.home()))
    secret = home / "secret.txt"
    secret.write_text("secret")
    secret.chmod(0o644)
    home.chmod(0o755)
    try:
        result = check("", [f"assert open({str(secret)!r}).read() == 'secret'", f"import os; assert os.listdir({str(home)!r})"])
        assert result.reward == 0.0
    finally:
        shutil.rmtree(home)


def test_opening_a_socket():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        server.setblocking(False)
        port = server.getsockname()[1]
        program = f"import socket\ndef call():\n    with socket.create_connection(('127.0.0.1', {port}), timeout=1) as s:\n" \
                  "        s.sendall(b'leak')\n    return True\n"
        result = check(program, ["assert call()"])
        if os.geteuid() == 0:
            assert result.reward == 0.0
            with pytest.raises(BlockingIOError):
                server.accept()


@root_only
def test_killing_its_parent():
    program = "import os, signal\ndef kill_parent():\n    os.kill(os.getppid(), signal.SIGKILL)\n    return True\n" \
              "try:\n    os.kill(-1, signal.SIGKILL)\nexcept OSError:\n    pass\n"
    assert check(program, ["assert kill_parent()"]).reward == 0.0
    assert os.getpid() > 0  # still here


@pytest.mark.parametrize("program", [
    "import os\nos._exit(0)",
    "import sys\nsys.exit(0)",
    "raise SystemExit(0)",
    "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)",
])
def test_exiting_before_the_tests_run(program):
    assert check(program, ["assert False"]).reward == 0.0


@pytest.mark.parametrize("program", [
    # fake result records on every descriptor, then leave before the failing test
    "import os\nfor fd in range(1, 64):\n    for i in range(4):\n        try:\n"
    "            os.write(fd, f'PASS {i}\\n0 {i}\\n'.encode())\n        except OSError:\n            pass\nos._exit(0)",
    # assert statements raise the real AssertionError whatever the builtins say
    "import builtins\nbuiltins.AssertionError = type('Nothing', (Exception,), {})\ndef add(a, b):\n    return a - b",
    # the harness's own names are out of reach: patching __main__ and os changes nothing
    "import __main__, os\n__main__.main = lambda: None\nos.write = lambda fd, data: len(data)\n"
    "def add(a, b):\n    return a - b",
    # a check() defined ahead of the test's own is replaced by it
    "def check(candidate):\n    pass\ndef add(a, b):\n    return a - b",
    # "always equal": a result that equals anything
    "class Same:\n    def __eq__(self, other):\n        return True\n    def __ne__(self, other):\n        return False\n"
    "def add(a, b):\n    return Same()",
    "class Same(int):\n    def __eq__(self, other):\n        return True\ndef add(a, b):\n    return Same(0)",
    "class Same(list):\n    def __eq__(self, other):\n        return True\ndef add(a, b):\n    return Same()",
    # rebinding the comparison from inside the function the test calls
    "def add(a, b):\n    globals()['__strict_eq__'] = lambda x, y: True\n    return None",
])
def test_redefining_the_harness(program):
    result = check(program, ["assert add(1, 1) == 2", "def check(c):\n    assert c(2, 2) == 4\n    assert c(0, 0) == 0\n"
                             "check(add)", "assert [add(1, 1)] == [2]", "assert not add(1, 2) != 3"])
    assert result.reward == 0.0


def test_records_written_just_before_the_harness_exits_are_read():
    """The race behind a lost record: the last write lands after a select that found nothing and
    before the poll that sees the exit; the reader must still drain the pipe."""
    read_fd, write_fd = os.pipe()

    class ExitsWhileWriting:
        def poll(self):
            os.write(write_fd, b"last record\n")
            return 0

    try:
        report, timed_out = sandbox._read_report(ExitsWhileWriting(), read_fd, time.monotonic() + 5, 1024)
    finally:
        os.close(read_fd)
        os.close(write_fd)
    assert (report, timed_out) == (b"last record\n", False)


def test_concurrent_checks_share_the_slots():
    programs = [f"def f():\n    return {i}" for i in range(6)]
    roomy = dataclasses.replace(LIMITS, timeout=30.0)  # six interpreters starting at once on a busy machine
    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(lambda p: run_tests(p, ["assert f() == 3", "assert f() >= 0"], roomy), programs))
    assert [(r.passed, r.status) for r in results] == [(1, "ok")] * 3 + [(2, "ok")] + [(1, "ok")] * 2
    assert sandbox._slots.qsize() == sandbox.MAX_SLOTS and sandbox_processes() == []


def test_strict_equality_keeps_honest_results():
    program = "from fractions import Fraction\ndef f(x):\n    return x\ndef half():\n    return Fraction(1, 2)"
    tests = ["assert f(3) == 3.0", "assert half() == 0.5", "assert f([1, (2, 'a')]) == [1, (2, 'a')]",
             "assert f({'k': [1.5]}) == {'k': [1.5]}", "assert f(None) == None", "assert f(2) != 3",
             "assert f(True) == 1", "assert f('a') == 'a' and f(b'a') == b'a'", "assert f([1]) != (1,)",
             "assert f((1, 2)) == [1, 2]"]
    result = check(program, tests)
    assert result.passed == len(tests) - 1  # only the last fails, as it does in plain Python
