"""The differential offload check, shared by the in-memory and the stdio tests: the same programs of context
calls (tests/fixtures/context_tools.py) against a bare server and one whose `act` tool loopwatch moved off
the loop; what the client sees of each call (its result, and its log and progress notifications in order)
must be equal."""

import anyio
import mcp_types as types
from mcp import Client

PROGRAMS = [
    ["info"],
    ["info", "info"],
    ["debug", "debug"],
    ["info", "sleep0", "info"],
    ["info", "sleep", "info"],
    ["warning", "error", "log", "debug", "info"],
    ["progress", "progress"],
    ["progress", "info", "sleep0", "progress", "info"],
    ["elicit"],
    ["elicit", "info", "elicit"],
    ["sample"],
    ["sample", "sample", "info"],
    ["roots", "roots"],
    ["read", "read", "info"],
    ["notify", "info"],
    ["isinstance"],
    ["block", "info", "info"],
]
"""Each run once, one after another."""

AT_ONCE = [
    ["info", "info"],
    ["info", "sleep0", "info", "progress"],
    ["sample", "info", "sleep", "info"],
    ["progress", "elicit", "progress"],
    ["debug", "roots", "debug"],
    ["info", "sleep", "info", "info"],
]
"""Run side by side, twice over: several moved calls in flight at once."""

BACK_CHANNEL = {"elicit", "sample", "roots"}
"""Requests from the server to the client: in the 2026-07-28 era a tool can't send them (no back-channel)."""


def for_era(programs: list[list[str]], mode: str) -> list[tuple[int, list[str]]]:
    """The programs a tool can run in this era, with their places in the list (their tags stay the same)."""
    return [(i, p) for i, p in enumerate(programs) if mode == "legacy" or not BACK_CHANNEL & set(p)]


class Seen:
    """What the client received, by the tag each call put in its messages."""

    def __init__(self) -> None:
        self.by_call: dict[str, list] = {}
        self.other: list[str] = []

    def add(self, tag: str, item: tuple) -> None:
        self.by_call.setdefault(tag.rsplit(":", 1)[0], []).append(item)

    async def on_log(self, params: types.LoggingMessageNotificationParams) -> None:
        data = params.data
        tag = data.get("msg") if isinstance(data, dict) else data  # fastmcp sends {"msg": ..., "extra": ...}
        self.add(str(tag), ("log", params.level, data))

    async def on_message(self, message) -> None:
        if isinstance(message, types.ResourceListChangedNotification):
            self.other.append("resources/list_changed")


async def on_sampling(context, params: types.CreateMessageRequestParams) -> types.CreateMessageResult:
    text = params.messages[0].content.text
    return types.CreateMessageResult(role="assistant", content=types.TextContent(type="text", text=f"re {text}"),
                                     model="echo")


async def on_elicit(context, params) -> types.ElicitResult:
    return types.ElicitResult(action="accept", content={"ok": True})


async def on_roots(context) -> types.ListRootsResult:
    return types.ListRootsResult(roots=[types.Root(uri="file:///tmp/project", name="project")])


async def outcomes(target, mode: str, programs=PROGRAMS, at_once=AT_ONCE, timeout: float = 60) -> dict:
    """Every call's result and notifications, by call; bounded by `timeout` in all."""
    seen = Seen()
    results: dict[str, dict] = {}

    async def call(client: Client, tag: str, steps: list[str]) -> None:
        async def on_progress(progress, total, message):
            seen.add(message, ("progress", progress, total, message))

        result = await client.call_tool("act", {"tag": tag, "steps": steps}, progress_callback=on_progress)
        results[tag] = result.model_dump(exclude={"meta"})

    client = Client(target, mode=mode, log_level="debug", logging_callback=seen.on_log,
                    sampling_callback=on_sampling, elicitation_callback=on_elicit, list_roots_callback=on_roots,
                    message_handler=seen.on_message)
    programs, at_once = for_era(programs, mode), for_era(at_once, mode)
    with anyio.fail_after(timeout):
        async with client:
            for index, steps in programs:
                await call(client, f"p{index}", steps)
            for round_ in range(2):
                async with anyio.create_task_group() as tg:
                    for index, steps in at_once:
                        tg.start_soon(call, client, f"r{round_}c{index}", steps)
    tags = sorted(results)
    return {tag: {"result": results[tag], "messages": seen.by_call.get(tag, [])} for tag in tags} | {
        "other": sorted(seen.other)
    }


def assert_not_vacuous(bare: dict, progress: bool = True) -> None:
    """The bare run itself shows what the programs do: logs, progress and answers arrived."""
    two_logs = bare["p1"]
    assert not two_logs["result"]["is_error"], two_logs
    assert [m[0] for m in two_logs["messages"]] == ["log", "log"], two_logs
    if progress:
        assert [m[0] for m in bare["p6"]["messages"]] == ["progress", "progress"], bare["p6"]
    for tag, row in bare.items():
        if tag != "other":
            assert not row["result"]["is_error"], (tag, row)
