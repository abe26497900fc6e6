"""`loopwatch.servers`: which family a server is, and what happens on an SDK loopwatch can't watch."""

import logging

import pytest
from mcp import Client
from mcp.server.lowlevel import Server
from mcp.server.mcpserver import MCPServer

import loopwatch
import loopwatch.servers
from loopwatch.servers import adapter_for, version_problem

from helpers import fresh

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend():
    return "asyncio"


def test_each_server_of_this_sdk_gets_its_family():
    assert adapter_for(Server("low")).family == "mcp2-lowlevel"
    assert adapter_for(MCPServer("high")).family == "mcp2-mcpserver"
    assert adapter_for(fresh("fm_server", "app")).family == "fastmcp4"


def test_a_subclass_defined_in_user_code_is_its_frameworks_family():
    from fastmcp import FastMCP

    class MyServer(FastMCP):
        pass

    assert adapter_for(MyServer("mine")).family == "fastmcp4"


def test_something_else_is_no_server():
    with pytest.raises(TypeError, match="expected an mcp Server"):
        adapter_for(object())


@pytest.mark.parametrize("version", ["1.24.0", "1.30.0", "2.0.0", "2.3.0", "2.9.1rc1"])
def test_supported_versions_have_no_problem(version):
    assert version_problem(version) == ""


@pytest.mark.parametrize("version", ["0.9.1", "1.23.3", "3.0.0"])
def test_other_versions_are_named_with_the_supported_ones(version):
    assert version_problem(version) == (
        f"mcp {version} found; supported: {loopwatch.servers.SUPPORTED}. The server runs unwatched."
    )


async def test_an_sdk_loopwatch_cannot_watch_gets_one_line_and_the_server_runs_unwatched(monkeypatch, caplog):
    monkeypatch.setattr(loopwatch.servers, "sdk_version", lambda: "3.0.0")
    server = fresh("inventory_server", "mcp")
    with caplog.at_level(logging.WARNING, logger="loopwatch"):
        handle = loopwatch.instrument(server)
        assert loopwatch.instrument(server) is handle
    lines = [r.getMessage() for r in caplog.records if r.name == "loopwatch"]
    assert lines == [version_problem("3.0.0")]
    assert handle.middleware not in server._lowlevel_server.middleware
    async with Client(server) as client:
        answer = await client.call_tool("ping", {})
    assert not answer.is_error
    assert handle.snapshot()["tools"] == {} and not handle.monitor.active
    handle.uninstrument()
