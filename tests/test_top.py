"""`loopwatch top`'s words and order, from plain states (no sockets, no terminal)."""

import importlib.util
from pathlib import Path

from loopwatch import cli
from loopwatch.top import Server, ls_text, once_text, row, sort_servers


def state(name, pid, blocked=False, lag=0.001, blocks=0, **extra):
    return {
        "ok": True, "name": name, "pid": pid, "command": ["/usr/bin/python3", "-m", "loopwatch", "run", f"{name}.py"],
        "transport": "stdio", "backend": "asyncio", "started_at": 100.0, "now": 160.0, "threshold_s": 0.1,
        "lag_now_s": lag, "blocked": blocked, "in_flight": 1 if blocked else 0, "off_loop": [],
        "minute": {"blocks": blocks, "blocked_s": 0.0, "window_s": 60.0, "share": 0.25 if blocks else 0.0},
        "snapshot": {"tools": {}, "methods": {}, "lag": {"p99_s": 0.004, "max_s": 0.2}}, **extra,
    }


STUCK = state(
    "search", 42, blocked=True, lag=2.5, blocks=1,
    serving={"method": "tools/call", "tool": "query", "request_id": "7", "for_s": 2.5},
    stack=[{"file": "/srv/search/server.py", "line": 10, "function": "query"},
           {"file": "/srv/search/db.py", "line": 88, "function": "fetch"}],
    culprit={"file": "/srv/search/server.py", "line": 10, "function": "query"},
)


def servers():
    return [Server(Path("/r/1.1.sock"), state("alpha", 7)), Server(Path("/r/42.1.sock"), STUCK),
            Server(Path("/r/9.1.sock"), state("beta", 9, blocks=3))]


def test_a_stuck_server_comes_first_whatever_the_sort():
    for by in ("state", "lag", "blocks", "name", "pid"):
        assert sort_servers(servers(), by)[0].name == "search"
    assert [s.name for s in sort_servers(servers(), "name")] == ["search", "alpha", "beta"]
    assert [s.name for s in sort_servers(servers(), "blocks")] == ["search", "beta", "alpha"]


def test_a_server_that_does_not_answer_counts_as_stuck_and_says_why():
    silent = Server(Path("/r/5.1.sock"), state("quiet", 5), error="no answer (TimeoutError)", silent_since=1.0)
    assert sort_servers([*servers(), silent])[1].name == "quiet" and silent.status() == "NO ANSWER"
    assert "NO ANSWER  quiet (pid 5): no answer (TimeoutError)" in once_text([silent])


def test_once_names_the_stuck_call_and_line_above_the_table():
    text = once_text(servers())
    lines = text.splitlines()
    assert "3 servers, 1 stuck" in lines[0]
    stuck = next(i for i, line in enumerate(lines) if line.startswith("BLOCKED"))
    header = next(i for i, line in enumerate(lines) if line.startswith("NAME"))
    assert stuck < header
    assert "search (pid 42)  tools/call query (request 7)" in lines[stuck]
    assert "at search/db.py:88 in fetch <- search/server.py:10 in query" in text
    assert row(servers()[1])[:4] == ["search", "42", "stdio", "BLOCKED"]
    assert row(servers()[1])[9] == "25%"


def test_ls_lists_each_server_with_its_socket():
    text = ls_text(servers())
    assert text.splitlines()[0].split() == ["PID", "NAME", "TRANSPORT", "STATE", "UP", "COMMAND", "SOCKET"]
    assert [line.split()[0] for line in text.splitlines()[1:]] == ["7", "9", "42"]
    assert "/r/42.1.sock" in text and " 1 min " in text


def test_top_without_textual_says_which_extra_to_install(monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "textual" else real(name, *a))
    assert cli.main(["top"]) == 2
    assert "pip install 'loopwatch[top]'" in capsys.readouterr().err
