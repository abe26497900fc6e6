"""The `loopwatch` logger's lines say `loopwatch` once: the CLI's format puts it before the level
(`... loopwatch WARNING tool x ...`), and a program's own logging names the logger; no message repeats it."""

import ast
from pathlib import Path

import loopwatch

LEVELS = {"debug", "info", "warning", "error", "exception", "critical", "log"}
SOURCE = Path(loopwatch.__file__).parent


def log_messages():
    for path in sorted(SOURCE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.args):
                continue
            owner = node.func.value
            if node.func.attr not in LEVELS or not (isinstance(owner, ast.Name) and owner.id.endswith("logger")):
                continue
            first = node.args[1] if node.func.attr == "log" and len(node.args) > 1 else node.args[0]
            if isinstance(first, ast.JoinedStr):
                first = first.values[0] if first.values else first
            if isinstance(first, ast.Constant) and isinstance(first.value, str):
                yield f"{path.relative_to(SOURCE)}:{node.lineno}", first.value


def test_the_scan_finds_the_log_calls():
    found = dict(log_messages())
    assert len(found) > 40 and any(text.startswith("watches server") for text in found.values())


def test_no_log_message_starts_with_loopwatch():
    doubled = [(where, text) for where, text in log_messages() if text.lower().startswith("loopwatch")]
    assert doubled == []


def test_a_message_logged_as_it_is_does_not_start_with_loopwatch_either():
    from loopwatch.servers import version_problem

    assert version_problem("3.0.0").startswith("mcp 3.0.0 found; supported: ")
