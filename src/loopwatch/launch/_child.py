"""In a process of `loopwatch run -- COMMAND`: watch a server the program just made, with the launcher's options.

Imported by the start-up hook only when a server object exists. Nothing here may break the program: a bad
option, a missing extra or a server loopwatch cannot instrument is one line on stderr, and the server runs
(unwatched, or watched without the missing integration).
"""

from __future__ import annotations

import logging
import os
from typing import Any

logger = logging.getLogger("loopwatch")

# extra -> the options that ask for it: turned off (one line says so) when the extra is missing in this Python.
EXTRA_OPTIONS: dict[str, dict[str, Any]] = {
    "prometheus": {"metrics_port": None, "metrics_path": None},
    "monitor": {"monitor": False},
    "otel": {},
}


def options_from_env() -> dict[str, Any]:
    """The options `loopwatch run` passed down, read as the CLI reads LOOPWATCH_* variables."""
    import argparse

    from ..cli import _add_run_options, run_options

    parser = argparse.ArgumentParser(add_help=False)
    _add_run_options(parser)
    return run_options(parser.parse_args([]))


def watch_created(server: Any) -> bool:
    """Watch `server`; True when it is watched. Called once per server object, where it was made."""
    from ..cli import UsageError, setup_logging

    if not logger.handlers:
        setup_logging(os.environ.get("LOOPWATCH_DEBUG") == "1")
    name = getattr(server, "name", None) or type(server).__name__
    try:
        options = options_from_env()
    except UsageError as exc:
        logger.error("%s; server %r runs unwatched", exc, name)
        return False
    _configure_tracing(name)
    policies = options["tool_policies"]
    later = {tool: policy for tool, policy in policies.items() if policy in ("always", "process")}
    now = {tool: "auto" if tool in later else policy for tool, policy in policies.items()}  # keeps the offloader
    handle = _instrument(server, name, {**options, "tool_policies": now})
    if handle is None or not handle.adapter.supported:  # instrument() said why, in one line
        return False
    _apply_policies_at_start(handle, later)
    logger.info("watches server %r in pid %d (threshold %.0f ms)", name, os.getpid(),
                options["threshold"] * 1000)
    return True


def _apply_policies_at_start(handle: Any, always: dict[str, str]) -> None:
    """The server is watched as it is made, before the program registers its tools: `always` policies are
    applied when it starts serving, once the tools exist."""
    offload = handle.offload
    if not always or offload is None:
        return

    def apply() -> None:
        for tool, policy in always.items():
            if tool not in offload.offloaded:
                offload.set_policy(tool, policy, reason="--offload-policy")

    handle.monitor.start_hooks.append(apply)


def _configure_tracing(name: str) -> None:
    try:
        from ..otel import configure_from_env

        configure_from_env(service_name=name)
    except Exception as exc:  # OptionError (no opentelemetry), an exporter that fails: traces off, server runs
        logger.error("no traces for server %r: %s", name, exc)


def _instrument(server: Any, name: str, options: dict[str, Any]) -> Any:
    from .._extensions import MissingExtra
    from ..mcp import instrument

    for _ in range(len(EXTRA_OPTIONS) + 1):
        try:
            return instrument(server, **options)
        except MissingExtra as exc:
            extra = _extra_of(exc)
            if extra is None:
                logger.error("cannot watch server %r: %s; it runs unwatched", name, exc)
                return None
            logger.error("%s (in %s); server %r is watched without it", exc, _python(), name)
            options = {**options, **EXTRA_OPTIONS[extra]}
        except Exception as exc:  # TypeError: not a server loopwatch supports here; OptionError; OSError
            logger.error("cannot watch server %r: %s; it runs unwatched", name, exc)
            return None
    return None


def _extra_of(exc: Exception) -> str | None:
    text = str(exc)
    return next((extra for extra in EXTRA_OPTIONS if f"loopwatch[{extra}]" in text), None)


def _python() -> str:
    import sys

    return sys.executable
