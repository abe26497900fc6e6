"""Where the optional integrations plug into an instrumented server, each only when asked for."""

from __future__ import annotations

from typing import Any


def install_extensions(handle: Any) -> None:
    """Attach what the options ask for. Each integration imports its package lazily."""
    return None
