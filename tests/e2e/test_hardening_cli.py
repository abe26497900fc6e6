"""Hardening (issue 21) as a user of `loopwatch run` meets it: clear one-line errors, the SDK's DNS-rebinding
protection on every HTTP app, and SIGINT ending the process as it ends the bare server.

Each test here failed on the code before the fix it checks.
"""

import http.client
import json
import signal
import subprocess
import sys
import threading
import time

import pytest

from helpers import FIXTURES, free_port

pytestmark = pytest.mark.e2e

LOOPWATCH = [sys.executable, "-m", "loopwatch", "run"]
INITIALIZE = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
    "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "raw", "version": "1"}}}


def run(*args, timeout=60):
    return subprocess.run([*LOOPWATCH, *args], stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout,
                          cwd=str(FIXTURES))


def ours(stderr: bytes) -> list[str]:
    return [line for line in stderr.decode(errors="replace").splitlines() if line.startswith("loopwatch:")]


# -- 12: a lifespan that raises ----------------------------------------------------------------------------


def test_a_lifespan_that_raises_is_reported_with_its_own_exception():
    bare = subprocess.run([sys.executable, "raising_lifespan.py"], stdin=subprocess.DEVNULL, capture_output=True,
                          timeout=60, cwd=str(FIXTURES))
    assert b"ConnectionRefusedError: cannot reach the database at db:5432" in bare.stderr  # what the bare one shows
    done = run("raising_lifespan.py")
    assert done.returncode == bare.returncode == 1 and done.stdout == b""
    assert ours(done.stderr) == [
        "loopwatch: the server failed: ConnectionRefusedError: cannot reach the database at db:5432"
    ]


# -- 15: --metrics-path under stdio ------------------------------------------------------------------------


def test_a_metrics_path_under_stdio_is_said_to_be_ignored():
    done = run("inventory_server.py", "--metrics-path", "/metrics")
    assert done.returncode == 0 and done.stdout == b""
    warned = [line for line in done.stderr.decode().splitlines() if "--metrics-path" in line]
    assert len(warned) == 1 and "ignored under stdio" in warned[0], done.stderr


# -- 16: SIGINT in the middle of a call --------------------------------------------------------------------


def interrupted(command):
    """Start a call that takes seconds, send SIGINT in the middle of it: (how it ended, stdout after the call)."""
    proc = subprocess.Popen(command, cwd=str(FIXTURES), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, preexec_fn=default_sigint)
    try:
        def send(message):
            proc.stdin.write(json.dumps(message).encode() + b"\n")
            proc.stdin.flush()

        send(INITIALIZE)
        assert json.loads(proc.stdout.readline())["id"] == 1
        send({"jsonrpc": "2.0", "method": "notifications/initialized"})
        send({"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {"name": "nap", "arguments": {}}})
        time.sleep(1.0)  # the call is in flight: it naps five seconds
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    return proc.returncode, out, err


def test_sigint_in_the_middle_of_a_call_ends_loopwatch_run_by_the_signal_as_it_ends_the_bare_server():
    bare_code, bare_out, bare_err = interrupted([sys.executable, "sleepy_server.py"])
    code, out, err = interrupted([*LOOPWATCH, "sleepy_server.py"])
    assert code == bare_code == -signal.SIGINT  # killed by the signal, not exit(130)
    for stderr in (err, bare_err):
        assert stderr.decode().rstrip().endswith("KeyboardInterrupt")
    for stdout in (out, bare_out):  # at most the SDK's shutdown answer to the call in flight, as whole lines
        assert all(json.loads(line) == {"jsonrpc": "2.0", "id": 2, "error": {
            "code": -32000, "message": "Connection closed"}} for line in stdout.splitlines()), stdout


def probed(command):
    """SIGINT in the middle of a call to tests/fixtures/sigint_probe.py: (exit status, stdout, the loop iterations
    from the SDK handing the transport its answer to the call to the transport's exit)."""
    proc = subprocess.Popen(command, cwd=str(FIXTURES), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, preexec_fn=default_sigint)
    count, err, napping = [], [], threading.Event()

    def read_stderr():
        for line in proc.stderr:
            err.append(line)
            if line.startswith(b"probe: napping"):
                napping.set()
            elif line.startswith(b"probe: "):
                count.append(int(line.split()[1]))
                proc.stdin.close()  # a client that goes away; only now, so its EOF cannot change the count

    reader = threading.Thread(target=read_stderr, daemon=True)
    try:
        proc.stdin.write(json.dumps(INITIALIZE).encode() + b"\n")
        proc.stdin.flush()
        assert json.loads(proc.stdout.readline())["id"] == 1
        reader.start()
        proc.stdin.write(b"".join(json.dumps(m).encode() + b"\n" for m in (
            {"jsonrpc": "2.0", "method": "notifications/initialized"},
            {"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {"name": "nap", "arguments": {}}})))
        proc.stdin.flush()
        assert napping.wait(60), b"".join(err).decode(errors="replace")  # the call is in flight: it naps a minute
        proc.send_signal(signal.SIGINT)
        try:
            code = proc.wait(20)
        except subprocess.TimeoutExpired:
            raise Unmoved(b"".join(err).decode(errors="replace")) from None
        out = proc.stdout.read()
        reader.join(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert len(count) == 1, b"".join(err).decode(errors="replace")
    return code, out, count[0]


class Unmoved(Exception):
    """The server went on after Ctrl-C: its call was not cancelled (seen once in a CI-like run, on the bare fastmcp
    server: it exited only when the 60 s nap ended). A race in the SDK's or anyio's handling of the cancellation,
    not loopwatch's: no loopwatch was in that process."""


def settled(command, tries=2):
    """`probed(command)`, run again (once) if the server went on after Ctrl-C; twice in a row fails the test."""
    for attempt in range(tries):
        try:
            return probed(command)
        except Unmoved as unmoved:
            if attempt == tries - 1:
                raise AssertionError(f"{command} went on after SIGINT in {tries} runs in a row:\n{unmoved}") from None
            print(f"{command}: went on after SIGINT; run again", file=sys.stderr)


def default_sigint():  # a test run in the background inherits SIGINT ignored: the servers must see it as a user does
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.parametrize("kind", ["lowlevel", "mcpserver", "fastmcp"])
def test_sigint_in_the_middle_of_a_call_leaves_the_sdk_no_more_chances_to_write_its_answer_than_bare(kind):
    """The bare server writes nothing when Ctrl-C comes in the middle of a call: the SDK hands the transport a
    `Connection closed` answer, and cancels the transport before its writer (a worker thread) gets to flush it.
    Under `loopwatch run` that answer was written in 3 runs of 22: the watch's task group, in the server's
    lifespan, took two loop iterations more on the way out. The count is deterministic (a few runs each, the
    least of each: a thread's wake-up rarely lands inside the count); the wrapped one must not exceed bare's."""
    probe = [sys.executable, "sigint_probe.py", kind]
    bare = [settled(probe) for _ in range(2)]
    wrapped = [settled([*LOOPWATCH, "--no-announce", "--", *probe]) for _ in range(4)]
    assert {code for code, _, _ in bare + wrapped} == {-signal.SIGINT}
    assert min(n for _, _, n in wrapped) <= min(n for _, _, n in bare), (bare, wrapped)
    for _, out, _ in bare + wrapped:  # at most the SDK's shutdown answer to the call in flight, a whole line
        assert all(json.loads(line)["id"] == 2 for line in out.splitlines()), out


# -- 11: the low-level Server over SSE ---------------------------------------------------------------------


def status(port, method, path, host):
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request(method, path, body=b"{}" if method == "POST" else None,
                           headers={"Host": host, "Content-Type": "application/json"})
        return connection.getresponse().status
    finally:
        connection.close()


@pytest.mark.parametrize("server", ["low_server.py", "inventory_server.py"])
def test_over_sse_a_foreign_host_gets_421_from_every_kind_of_server(server):
    port = free_port()
    proc = subprocess.Popen([*LOOPWATCH, server, "--transport", "sse", "--port", str(port)], cwd=str(FIXTURES),
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                code = status(port, "GET", "/sse", f"rebound.example:{port}")
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.poll() else ""
                time.sleep(0.1)
        assert code == 421  # a DNS-rebinding page, as the SDK's own apps answer it
        assert status(port, "POST", "/messages/?session_id=0", f"rebound.example:{port}") == 421
    finally:
        proc.terminate()
        proc.wait(15)


# -- 2: a hostile request id over a real stdio pipe --------------------------------------------------------

EVIL_ID = "7\n2026-12-01 00:00:00,000 loopwatch WARNING forged line\x1b[2J\x1b]0;owned\x07" + "x" * 1_000_000


def test_a_hostile_request_id_over_stdio_is_answered_as_sent_and_reported_cut_and_escaped(tmp_path):
    events, errors = tmp_path / "events.jsonl", tmp_path / "stderr.txt"
    with open(errors, "wb") as stderr:
        proc = subprocess.Popen([*LOOPWATCH, "inventory_server.py", "--events", str(events), "--offload", "off"],
                                cwd=str(FIXTURES), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr)
        try:
            call = {"jsonrpc": "2.0", "id": EVIL_ID, "method": "tools/call",
                    "params": {"name": "lookup", "arguments": {"sku": "E"}}}
            lines = [INITIALIZE, {"jsonrpc": "2.0", "method": "notifications/initialized"}, call]
            # stdin stays open until both answers are in, as a client's does: at end of input the SDK cancels the
            # calls still in flight, bare or wrapped (a bare server under load lost this answer in 7 runs of 20
            # when its input closed right behind the call); the guard kills a server that never answers
            guard = threading.Timer(60, proc.kill)
            guard.start()
            try:
                proc.stdin.write(b"".join(json.dumps(m).encode() + b"\n" for m in lines))
                proc.stdin.flush()
                out = [proc.stdout.readline() for _ in range(2)]
            finally:
                guard.cancel()
            proc.stdin.close()
            assert proc.wait(30) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
    answers = [json.loads(line) for line in out if line]
    assert [a["id"] for a in answers] == [1, EVIL_ID] and "result" in answers[1]  # the client's id, untouched
    text = errors.read_bytes()
    assert b"\x1b" not in text and b"\x07" not in text
    assert not [line for line in text.splitlines() if line.startswith(b"2026-12-01 00:00:00,000")]  # no forged line
    assert max(map(len, text.splitlines())) < 4096
    [event] = [json.loads(line) for line in events.read_text().splitlines()]
    assert event["tool"] == "lookup" and event["request_id"].startswith("7\\x0a2026-12-01")
    assert len(event["request_id"]) <= 4 * 200
