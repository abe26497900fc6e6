"""`loopwatch report`: the summary per tool, speedscope JSON valid against speedscope's schema, folded stacks."""

import json
import time
from pathlib import Path

import anyio
import jsonschema
import pytest
from mcp import Client
from mcp.server.mcpserver import MCPServer

import loopwatch
from loopwatch import cli
from loopwatch.report import folded, load_events, speedscope, summary

from helpers import settle

SCHEMA = json.loads((Path(__file__).parent / "speedscope-file-format.schema.json").read_text())
HERE = Path(__file__).read_text().splitlines()


def line_of(text):
    return next(n for n, line in enumerate(HERE, 1) if text in line and "line_of" not in line)


def blocking_server():
    server = MCPServer("reported")

    @server.tool()
    async def nap() -> str:
        time.sleep(0.25)  # nap blocks here
        return "ok"

    @server.tool()
    async def spin() -> str:
        end = time.perf_counter() + 0.25
        while time.perf_counter() < end:  # spin blocks here
            pass
        return "ok"

    return server


@pytest.fixture
def events_file(tmp_path):
    """A real events file: a server that blocked twice in nap and once in spin."""
    path = tmp_path / "events.jsonl"
    server = blocking_server()
    handle = loopwatch.instrument(server, events=str(path), log_blocks=False, offload="off", announce=False)

    async def main():
        async with Client(server) as client:
            for tool in ("nap", "nap", "spin"):
                await client.call_tool(tool, {})
                await settle(handle.monitor)

    anyio.run(main)
    with path.open("a") as out:
        out.write('{"event": "offloaded", "tool": "nap"}\n{"truncated": \n')  # another event, a torn line
    return path


def test_the_summary_names_each_tool_its_blocks_and_the_lines_to_fix(events_file):
    loaded = load_events(events_file)
    assert loaded.skipped == 1 and loaded.other_events == 1
    blocks = [b for b in loaded.blocks if b.kind != "gc"]
    assert sorted(b.root for b in blocks) == ["tools/call nap", "tools/call nap", "tools/call spin"]
    text = summary(blocks)
    assert "3 blocks" in text
    assert "tools/call nap: 2 blocks" in text and "tools/call spin: 1 block," in text
    assert f"test_report.py:{line_of('nap blocks here')} in nap" in text
    assert "time.sleep(0.25)  # nap blocks here" in text  # the source line, read by the report
    assert f"test_report.py:{line_of('spin blocks here')} in spin" in text or \
        f"test_report.py:{line_of('spin blocks here') + 1} in spin" in text


def test_the_speedscope_file_is_valid_against_speedscopes_schema_and_weighs_the_blocked_time(events_file):
    blocks = load_events(events_file).blocks
    data = speedscope(blocks)
    jsonschema.validate(data, SCHEMA)
    everything = data["profiles"][0]
    assert len(everything["samples"]) == len(blocks) == len(everything["weights"])
    assert everything["endValue"] == pytest.approx(sum(b.duration_s for b in blocks) * 1000, abs=0.01)
    frames = data["shared"]["frames"]
    assert all(0 <= i < len(frames) for sample in everything["samples"] for i in sample)
    roots = {frames[sample[0]]["name"] for sample in everything["samples"]}
    assert {"tools/call nap", "tools/call spin"} <= roots
    leaves = {(frames[s[-1]].get("line"), frames[s[-1]]["name"]) for s in everything["samples"]}
    assert any(name == "sleep" or line == line_of("nap blocks here") for line, name in leaves)
    names = {p["name"] for p in data["profiles"][1:]}
    assert {"tools/call nap", "tools/call spin"} <= names


def test_the_schema_rejects_a_file_speedscope_could_not_open():
    broken = {"$schema": "https://www.speedscope.app/file-format-schema.json", "shared": {"frames": []},
              "profiles": [{"type": "sampled", "name": "x", "unit": "milliseconds", "startValue": 0,
                            "endValue": 1, "samples": [[0]]}]}  # no weights
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, SCHEMA)


def test_folded_stacks_parse_back_to_the_blocks_stacks_and_durations(events_file):
    blocks = load_events(events_file).blocks
    text = folded(blocks)
    parsed = {}
    for line in text.splitlines():
        stack, _, weight = line.rpartition(" ")
        assert stack and weight.isdigit(), line  # `frame;frame;... INTEGER`, as flamegraph.pl reads it
        parsed[stack] = int(weight)
    assert sum(parsed.values()) == pytest.approx(sum(b.duration_s for b in blocks) * 1000, abs=len(blocks))
    nap = [s for s in parsed if s.startswith("tools/call nap;")]
    assert nap and all(f"nap (tests/test_report.py:{line_of('nap blocks here')})" in s.split(";") for s in nap)
    assert all(";" not in part for stack in parsed for part in stack.split(";"))


def test_the_command_prints_the_summary_and_writes_both_files(events_file, tmp_path, capsys):
    out_json, out_folded = tmp_path / "p.speedscope.json", tmp_path / "p.folded"
    code = cli.main(["report", str(events_file), "--speedscope", str(out_json), "--folded", str(out_folded)])
    printed = capsys.readouterr().out
    assert code == 0
    assert "tools/call nap: 2 blocks" in printed and "1 unreadable lines skipped" in printed
    jsonschema.validate(json.loads(out_json.read_text()), SCHEMA)
    assert out_folded.read_text() == folded(load_events(events_file).blocks)


def test_rotated_events_files_are_read_together(events_file, tmp_path, capsys):
    older = tmp_path / "events.jsonl.1"
    older.write_text(events_file.read_text())
    assert cli.main(["report", str(older), str(events_file)]) == 0
    printed = capsys.readouterr().out
    assert "tools/call nap: 4 blocks" in printed and "2 unreadable lines skipped" in printed


def test_a_missing_events_file_is_one_clear_line(tmp_path, capsys):
    assert cli.main(["report", str(tmp_path / "nope.jsonl")]) == 2
    assert capsys.readouterr().err.strip() == f"loopwatch: cannot read {tmp_path / 'nope.jsonl'}: no such file"
