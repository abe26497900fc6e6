"""Bad input over raw stdio: `loopwatch run` answers every line exactly as the bare server does.

Each line is written on its own; a request is awaited by its id, anything else is followed by a `ping`
whose answer marks the end of what that line caused. So the two transcripts line up message by message,
whatever the scheduling.
"""

import json
import queue
import subprocess
import sys
import threading

import pytest

from helpers import FIXTURES

pytestmark = pytest.mark.e2e

WAIT = 60.0

INITIALIZE = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
    "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "raw", "version": "1"}}}


def call(request_id, params=..., method="tools/call"):
    message = {"jsonrpc": "2.0", "id": request_id, "method": method}
    if params is not ...:
        message["params"] = params
    return message


def as_line(message) -> bytes:
    text = message if isinstance(message, str) else json.dumps(message)
    return text.encode("utf-8", "surrogateescape") + b"\n"


BAD_LINES = [  # the bare server answers none of these (a ping after each shows what each one caused)
    "this is not json",
    '{"jsonrpc": "2.0", "id": 50, "method": ',  # cut short
    "\udcff\udcfe invalid UTF-8 bytes",
    '{"jsonrpc":"2.0","id":51,"method":"tools/call","params":{"name":"ping","arguments":{"n":"\udcff"}}}',
    "[" * 100_000 + "]" * 100_000,  # nesting deeper than any parser's recursion limit
    "",
    json.dumps([{"jsonrpc": "2.0", "id": 52, "method": "tools/list"}]),  # a batch
    {"id": 53, "method": "tools/list"},  # no jsonrpc member
    {"jsonrpc": "2.0", "id": {"an": "object"}, "method": "tools/list"},
    {"jsonrpc": "2.0", "method": "notifications/no_such_notification"},
    {"jsonrpc": "2.0", "id": 54, "result": {}},  # a response nobody asked for
    call(4, "not an object"),
    call(55, {"name": "ping", "arguments": {"n": 1, "deep": json.loads("[" * 400 + "]" * 400)}}),
]
REQUESTS = [
    call(2, {"name": "ping", "arguments": {"n": 2}}),
    call(3, {"name": "no_such_tool", "arguments": {}}),
    call(5, {"arguments": {}}),
    call(6, {"name": 42, "arguments": {}}),
    call(7, {"name": "ping", "arguments": [1, 2]}),
    call(8, {"name": "ping", "arguments": {"n": "many"}}),
    call(9, {"name": "ping", "arguments": {"n": 1, "pad": "x" * 2_000_000}}),
    call(10, {"name": "y" * 100_000, "arguments": {}}),
    call(11),
    call(12, None),
    call(13, {}, method="no/such/method"),
    call("fifteen", {"name": "ping", "arguments": {"n": 15}}),
    call(16, {"name": "fail", "arguments": {"reason": "out of stock"}}),
    call(17, {"name": "ping", "arguments": {"n": None}}),
    call(-1, {"name": "ping", "arguments": {"n": 1}}),
    call(2, {"name": "ping", "arguments": {"n": 2}}),  # an id used before
]


class RawServer:
    """A server subprocess spoken to line by line; stderr goes to a file so it can never fill a pipe."""

    def __init__(self, command, errors_path):
        self.errors = open(errors_path, "wb")
        self.process = subprocess.Popen(
            command, cwd=str(FIXTURES), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.errors
        )
        self.lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self._pings = 0

    def _read(self):
        for line in self.process.stdout:
            try:
                self.lines.put(json.loads(line))
            except ValueError:
                self.lines.put({"not protocol": line.decode(errors="replace")})
        self.lines.put(None)

    def send(self, message):
        self.process.stdin.write(as_line(message))
        self.process.stdin.flush()

    def until(self, request_id):
        """Everything that arrives up to and including the answer to `request_id`."""
        seen = []
        while True:
            message = self.lines.get(timeout=WAIT)
            assert message is not None, f"stdout closed before the answer to {request_id!r}"
            assert "not protocol" not in message, message
            seen.append(message)
            if message.get("id") == request_id and ("result" in message or "error" in message):
                return seen

    def exchange(self, message, answered):
        self.send(message)
        if answered:
            return self.until(message["id"])
        self._pings += 1
        marker = f"after-{self._pings}"
        self.send({"jsonrpc": "2.0", "id": marker, "method": "ping"})
        return self.until(marker)

    def close(self):
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(10)
        self.errors.close()


def transcript(command, errors_path):
    server = RawServer(command, errors_path)
    try:
        seen = [server.exchange(INITIALIZE, answered=True)]
        server.send({"jsonrpc": "2.0", "method": "notifications/initialized"})
        seen += [server.exchange(line, answered=False) for line in BAD_LINES]
        seen += [server.exchange(request, answered=True) for request in REQUESTS]
        # calls racing with shutdown: stdin closes while they are in flight
        for n in range(20):
            server.send(call(100 + n, {"name": "ping", "arguments": {"n": n}}))
        server.process.stdin.close()
        raced = []
        while (message := server.lines.get(timeout=WAIT)) is not None:
            raced.append(message)
        code = server.process.wait(WAIT)
    finally:
        server.close()
    seen[0][0]["result"]["serverInfo"] = "(differs)"
    return seen, raced, code


def test_every_bad_line_and_malformed_request_is_answered_as_the_bare_server_answers_it(tmp_path):
    bare, bare_raced, bare_code = transcript(
        [sys.executable, "-c", "import inventory_server; inventory_server.mcp.run()"], tmp_path / "bare.err"
    )
    wrapped, wrapped_raced, wrapped_code = transcript(
        [sys.executable, "-m", "loopwatch", "run", str(FIXTURES / "inventory_server.py"),
         "--events", str(tmp_path / "events.jsonl")],
        tmp_path / "wrapped.err",
    )
    assert len(wrapped) == len(bare) == 1 + len(BAD_LINES) + len(REQUESTS)
    for sent, got, expected in zip([INITIALIZE, *BAD_LINES, *REQUESTS], wrapped, bare, strict=True):
        assert got == expected, f"differs after {str(sent)[:120]}"
    assert wrapped_code == bare_code == 0
    for raced in (bare_raced, wrapped_raced):  # each call answered (or refused as the connection closed) once
        ids = [m["id"] for m in raced if "id" in m]
        assert len(ids) == len(set(ids)) and set(ids) <= set(range(100, 120))
        assert all("not protocol" not in m for m in raced)
    tracebacks = [(tmp_path / f"{k}.err").read_text(errors="replace").count("Traceback") for k in ("bare", "wrapped")]
    assert tracebacks[1] <= tracebacks[0]  # loopwatch adds no failure of its own
