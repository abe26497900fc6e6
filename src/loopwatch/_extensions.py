"""Where the optional integrations plug into an instrumented server, each only when asked for.

Each integration is a module with `install(handle) -> object` (the object may have `close()`,
called by `handle.uninstrument()`). It imports its package lazily and, when the package is
missing, says which extra to install.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
from typing import Any

logger = logging.getLogger("loopwatch")


class MissingExtra(ImportError):
    def __init__(self, package: str, extra: str) -> None:
        super().__init__(f"{package} is not installed: pip install 'loopwatch[{extra}]'")


def wanted(handle: Any) -> list[str]:
    o = handle.options
    names = ["_offload"]  # with offload off too: explicit choices (policy always, lw-offload) still apply
    if o.metrics or (o.metrics is None and (o.metrics_port is not None or o.metrics_path or o.metrics_registry)):
        names.append("prometheus")
    if o.traces and importlib.util.find_spec("opentelemetry") is not None:
        names.append("otel")
    if o.monitor:
        names.append("aiomonitor")
    if o.announce and not _announce_off_by_env():
        names.append("_announce")
    return names


def _announce_off_by_env() -> bool:
    from ._announce import disabled_by_env

    return disabled_by_env()


def install_extensions(handle: Any) -> None:
    for name in wanted(handle):
        module = importlib.import_module(f".{name}", __package__)  # a copy under another name uses its own
        handle.extensions.append(module.install(handle))
