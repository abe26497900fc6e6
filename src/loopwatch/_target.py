"""Load the server a user points `loopwatch run` at, and run it on the transport asked for."""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import inspect
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

DEFAULT_NAMES = ("mcp", "server", "app")


class TargetError(Exception):
    """The target can't be used; the message is the one line a user sees."""


def split_target(target: str) -> tuple[str, str | None]:
    base, sep, obj = target.rpartition(":")
    if sep and obj.isidentifier() and base and not (len(base) == 1 and base.isalpha()):
        return base, obj
    return target, None


def load_target(target: str) -> Any:
    """Import `path/to/server.py[:object]` or `package.module[:object]` and return the server object."""
    where, obj = split_target(target)
    with _no_serving(where):
        module = _import(where)
    names = (obj,) if obj else DEFAULT_NAMES
    for name in names:
        found = _find_server(module, name, where, explicit=obj is not None)
        if found is not None:
            return found
    tried = ", ".join(names)
    raise TargetError(f"no MCP server object in {where}: tried {tried}; to run it as its client launches it: "
                      f"{launch_hint(where, module)}")


def launch_hint(where: str, module: Any = None) -> str:
    """The `loopwatch run -- COMMAND` that runs this target's program as its client's config does."""
    if where.endswith(".py") or os.sep in where or "/" in where:
        return f"loopwatch run -- python {where} [ARGS...]"
    package = where.split(".")[0]
    scripts = [ep.name for ep in _console_scripts() if ep.module.split(".")[0] == package]
    if scripts:
        return f"loopwatch run -- {scripts[0]} [ARGS...]"
    return f"loopwatch run -- python -m {where} [ARGS...]"


def _console_scripts() -> list[Any]:
    from importlib.metadata import entry_points

    try:
        return list(entry_points(group="console_scripts"))
    except Exception:  # a broken distribution's metadata must not hide the real message
        return []


def _console_script_of(module: Any, name: str) -> str | None:
    modname = getattr(module, "__name__", None)
    return next((ep.name for ep in _console_scripts() if ep.module == modname and ep.attr == name), None)


# -- a target whose import serves --------------------------------------------------------------------------

# class -> its methods that start serving; imported here when their SDK is (fastmcp only when already imported).
SERVE_POINTS = (
    ("mcp.server.lowlevel.server", "Server", ("run",)),
    ("mcp.server.mcpserver.server", "MCPServer", ("run", "run_stdio_async", "run_streamable_http_async",
                                                   "run_sse_async")),
    ("fastmcp.server.server", "FastMCP", ("run", "run_async")),
)


class _ServesOnImport(BaseException):
    """Raised by a serve method during the target's import: BaseException, so the server's `except Exception`
    does not swallow it on the way out."""


@contextlib.contextmanager
def _no_serving(where: str) -> Iterator[None]:
    """While the target imports, starting to serve stops the import: it would serve bare, unwatched."""
    saved: list[tuple[type, str, Any]] = []
    for modname, clsname, methods in SERVE_POINTS:
        cls = _serve_class(modname, clsname)
        for method in methods if cls is not None else ():
            original = cls.__dict__.get(method)
            if original is not None:
                saved.append((cls, method, original))
                setattr(cls, method, _refuse(inspect.iscoroutinefunction(original)))
    try:
        yield
    except _ServesOnImport:
        raise TargetError(
            f"importing {where} starts serving (the server runs at import, not under `if __name__ == "
            f"\"__main__\"`): loopwatch stopped it before it served unwatched; run it as its client launches it: "
            f"{launch_hint(where)}"
        ) from None
    finally:
        for cls, method, original in saved:
            setattr(cls, method, original)


def _serve_class(modname: str, clsname: str) -> type | None:
    if modname.startswith("fastmcp") and modname not in sys.modules:
        return None
    try:
        module = importlib.import_module(modname)
    except ImportError:
        return None
    cls = getattr(module, clsname, None)
    return cls if isinstance(cls, type) else None


def _refuse(is_async: bool) -> Any:
    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise _ServesOnImport

    async def refuse_async(*args: Any, **kwargs: Any) -> Any:
        raise _ServesOnImport

    return refuse_async if is_async else refuse


def _import(where: str) -> Any:
    if where.endswith(".py") or os.sep in where or "/" in where:
        return _import_file(Path(where))
    try:
        with _stdout_to_stderr():
            return importlib.import_module(where)
    except ModuleNotFoundError as exc:
        if exc.name == where or where.startswith(f"{exc.name}."):
            raise TargetError(f"cannot import {where}: no such module (and it is not a .py file)") from exc
        raise TargetError(f"cannot import {where}: {type(exc).__name__}: {exc}") from exc
    except Exception as exc:
        raise TargetError(f"cannot import {where}: {type(exc).__name__}: {exc}") from exc


def _import_file(path: Path) -> Any:
    if not path.is_file():
        raise TargetError(f"cannot load {path}: no such file")
    path = path.resolve()
    folder = str(path.parent)
    if folder not in sys.path:
        sys.path.insert(0, folder)  # as when Python runs the file
    name = path.stem if path.stem not in sys.modules and path.stem.isidentifier() else "_loopwatch_target"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise TargetError(f"cannot load {path}: not a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        with _stdout_to_stderr():
            spec.loader.exec_module(module)
    except Exception as exc:
        sys.modules.pop(name, None)
        raise TargetError(f"cannot import {path}: {type(exc).__name__}: {exc}") from exc
    return module


@contextlib.contextmanager
def _stdout_to_stderr() -> Iterator[None]:
    """While the target imports, whatever it prints goes to stderr: stdout may be the protocol's."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def is_server(obj: Any) -> bool:
    from .servers import adapter_for

    try:
        adapter_for(obj)
    except TypeError:
        return False
    return not inspect.isclass(obj)


def _find_server(module: Any, name: str, where: str = "", explicit: bool = True) -> Any:
    obj = getattr(module, name, None)
    if obj is None:
        return None
    if is_server(obj):
        return obj
    if not callable(obj) or inspect.isclass(obj):
        return None
    hint = launch_hint(where, module)
    script = _console_script_of(module, name)
    if script is not None or (explicit and name == "main") or type(obj).__module__.startswith(("click", "typer")):
        program = f"the console script {script!r}" if script else "a program's"
        raise TargetError(f"{where}:{name} is {program} main(), not a server: loopwatch never calls it with its "
                          f"own command line; run the program as its client launches it: {hint}")
    if inspect.iscoroutinefunction(obj):
        if explicit:
            raise TargetError(f"{name} is an async function (it serves by itself, loopwatch cannot call it): {hint}")
        return None
    required = _required_params(obj)
    if required:
        raise TargetError(f"{name}() needs arguments ({', '.join(required)}) that loopwatch cannot give it; "
                          f"run the server as its client launches it, with its flags: {hint}")
    try:
        with _no_serving(where), _argv(where):
            made = obj()
    except TargetError:
        raise
    except SystemExit as exc:  # it parsed loopwatch's command line, or checked its own and gave up
        raise TargetError(f"{name}() exited ({exc.code}): a program's main(), not a server factory: {hint}") from None
    except Exception as exc:
        raise TargetError(f"{name}() raised {type(exc).__name__}: {exc}") from exc
    return made if made is not None and is_server(made) else None


@contextlib.contextmanager
def _argv(where: str) -> Iterator[None]:
    """A factory that reads the command line sees none (never loopwatch's own)."""
    saved = sys.argv
    sys.argv = [where]
    try:
        yield
    finally:
        sys.argv = saved


def _required_params(fn: Any) -> list[str]:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return ["?"]
    return [p.name for p in params if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]


# -- running ------------------------------------------------------------------------------------------


async def serve(server: Any, transport: str, host: str, port: int, extra_routes: list[Any] | None = None,
                listening: Callable[[str], None] | None = None) -> None:
    """Serve `server`; over HTTP, `listening(url)` is called once the port is bound (the URL a client connects to)."""
    if transport == "stdio":
        await _serve_stdio(server)
        return
    app = http_app(server, transport, host)
    path = endpoint_path(app)
    for route in extra_routes or ():
        app.router.routes.append(route)
    import uvicorn

    class Server(uvicorn.Server):
        async def startup(self, sockets: Any = None) -> None:
            await super().startup(sockets)
            if listening is not None and self.started and self.servers and self.servers[0].sockets:
                bound = self.servers[0].sockets[0].getsockname()[1]  # the port 0 picked
                listening(f"http://{f'[{host}]' if ':' in host else host}:{bound}{path}")

    config = uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="on")
    await Server(config).serve()


def endpoint_path(app: Any) -> str:
    """The path a client connects to: the app's first plain route (`/mcp`; `/sse`, before its `/messages` mount)."""
    for route in getattr(app, "routes", ()):
        if type(route).__name__ == "Route" and isinstance(getattr(route, "path", None), str):
            return route.path
    return "/"


async def _serve_stdio(server: Any) -> None:
    from .servers import adapter_for

    try:
        await adapter_for(server).serve_stdio()
    finally:
        _stdout_off_the_wire()


def _stdout_off_the_wire() -> None:
    """The SDK gives fd 1 back to the wire when its stdio transport ends; a call loopwatch moved to a worker loop
    may still be running then (a crash ended the server beside it) and print or flush afterwards. From here on
    fd 1 is stderr, so what it writes (and what sys.stdout still buffers) cannot reach the client as protocol."""
    try:
        os.dup2(2, 1)
    except OSError:
        pass


def http_app(server: Any, transport: str, host: str) -> Any:
    from .servers import adapter_for

    return adapter_for(server).http_app(transport, host)
