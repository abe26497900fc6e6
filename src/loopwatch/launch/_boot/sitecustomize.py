"""loopwatch's start-up hook for `loopwatch run -- COMMAND`: this folder is put first on PYTHONPATH.

Every Python process of COMMAND runs this at start-up (as `site` imports `sitecustomize`). It must cost a
process that creates no MCP server nothing measurable, so it imports nothing and starts nothing: it puts one
finder on `sys.meta_path` that waits for the modules defining the server classes (PATCH_POINTS), wraps their
`__init__` when they are imported, and only when a server object is made imports loopwatch (the copy this
Python has, or the launcher's own) to watch it with the options in the LOOPWATCH_* variables. Then it
imports the `sitecustomize` this one hides, if there is one, so a program's own start-up hook still runs.
Written for any Python 3 a command may run (a `uvx` tool's, another virtualenv's), and never raises.
"""

import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))

# module -> classes whose instances are MCP servers; each is watched when its outermost `__init__` returns
# (an MCPServer makes a low-level Server inside its own: the outer object is the one watched). How a server is
# watched is `loopwatch.launch._child.watch_created`, which asks `instrument()`; a new family is a new line.
PATCH_POINTS = {
    "mcp.server.lowlevel.server": ("Server",),
    "mcp.server.mcpserver.server": ("MCPServer",),
    "mcp.server.fastmcp.server": ("FastMCP",),
    "fastmcp.server.server": ("FastMCP",),
}

_TOP = "LOOPWATCH_LAUNCH_TOP"
_RECORD_DIR = "LOOPWATCH_LAUNCH_DIR"
_UNSEEN = "LOOPWATCH_LAUNCH_UNSEEN"


class _PatchingLoader:
    """Runs the real loader, then wraps the server classes; gives the real loader back to the module."""

    def __init__(self, loader, classes):
        self.loader = loader
        self.classes = classes

    def __getattr__(self, name):
        return getattr(self.loader, name)

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        spec = module.__spec__
        try:
            self.loader.exec_module(module)
        finally:
            if spec is not None and spec.loader is self:
                spec.loader = self.loader
            if getattr(module, "__loader__", None) is self:
                module.__loader__ = self.loader
        _patch_module(module, self.classes)


class _ServerFinder:
    """On `sys.meta_path`: finds nothing itself; for a watched module, wraps the loader the others find."""

    def __init__(self, points):
        self.points = points
        self.busy = set()

    def find_spec(self, name, path=None, target=None):
        classes = self.points.get(name)
        if classes is None or name in self.busy:
            return None
        self.busy.add(name)
        try:
            spec = _find_elsewhere(self, name, path, target)
        finally:
            self.busy.discard(name)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        spec.loader = _PatchingLoader(spec.loader, classes)
        return spec


def _find_elsewhere(skip, name, path, target):
    for finder in list(sys.meta_path):
        find = getattr(finder, "find_spec", None)
        if finder is skip or find is None:
            continue
        spec = find(name, path, target)
        if spec is not None:
            return spec
    return None


def _patch_module(module, classes):
    for name in classes:
        cls = getattr(module, name, None)
        if isinstance(cls, type):
            try:
                _wrap_init(cls)
            except Exception as exc:  # never break the import of the SDK
                _say(f"loopwatch: cannot hook {module.__name__}.{name} ({exc}); servers of it run unwatched")


_state = {"depth": None, "found": False}


def _wrap_init(cls):
    original = cls.__dict__.get("__init__")
    if original is None or getattr(original, "_loopwatch_launch", False):
        return
    import functools
    import threading

    if _state["depth"] is None:
        _state["depth"] = threading.local()
    depth = _state["depth"]

    @functools.wraps(original)
    def __init__(self, *args, **kwargs):
        depth.n = getattr(depth, "n", 0) + 1
        try:
            original(self, *args, **kwargs)
        finally:
            depth.n -= 1
        if depth.n == 0:
            _created(self)

    __init__._loopwatch_launch = True
    cls.__init__ = __init__


def _created(server):
    """A server object was made: watch it (never raising into the program that made it). Watched or not, the
    command made one: one that cannot be watched says so itself, in one line, and "watched nothing" is not said."""
    _state["found"] = True
    _record_found()
    try:
        watch = _import_watcher()
        if watch is not None:
            watch(server)
    except Exception as exc:
        _say(f"loopwatch: cannot watch this server ({type(exc).__name__}: {exc}); it runs unwatched")


def _import_watcher():
    """`watch_created` of the loopwatch this Python has, else of the launcher's own copy when it can run here."""
    try:
        from loopwatch.launch._child import watch_created
    except ImportError as exc:
        if "loopwatch" in sys.modules and not getattr(sys.modules["loopwatch"], "_loopwatch_borrowed", False):
            _say(f"loopwatch: the loopwatch installed for {sys.executable} cannot watch ({exc}); upgrade it there, or "
                 "`pip uninstall loopwatch` there to use the launcher's; the server runs unwatched")
            return None
        return _borrow()
    return watch_created


def _borrow():
    """This Python has no loopwatch: make the launcher's copy (and only it) importable, if it can run here."""
    package = os.path.dirname(os.path.dirname(_HERE))
    hint = "install loopwatch there (uvx --with loopwatch ..., or pip install loopwatch in that environment)"
    if sys.version_info < (3, 11):  # noqa: UP036 -- the command's Python, not loopwatch's
        version = ".".join(map(str, sys.version_info[:2]))
        _say(f"loopwatch: {sys.executable} is Python {version}, loopwatch needs 3.11+: {hint}; it runs unwatched")
        return None
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "loopwatch", os.path.join(package, "__init__.py"), submodule_search_locations=[package]
    )
    if spec is None or spec.loader is None:
        _say(f"loopwatch: cannot load loopwatch from {package}: {hint}; the server runs unwatched")
        return None
    module = importlib.util.module_from_spec(spec)
    module._loopwatch_borrowed = True
    sys.modules["loopwatch"] = module
    try:
        spec.loader.exec_module(module)
        from loopwatch.launch._child import watch_created
    except Exception as exc:
        for name in [n for n in sys.modules if n == "loopwatch" or n.startswith("loopwatch.")]:
            del sys.modules[name]
        reason = f"{type(exc).__name__}: {exc}"
        _say(f"loopwatch: {sys.executable} has no loopwatch and the launcher's cannot run there ({reason}): {hint}; "
             "the server runs unwatched")
        return None
    return watch_created


def _say(line):
    try:
        sys.stderr.write(line + "\n")
        sys.stderr.flush()
    except Exception:
        pass


# -- "watched nothing", said once, by the first Python process of the command, when none made a server --------


def _record_path():
    folder = os.environ.get(_RECORD_DIR)
    top = os.environ.get(_TOP)
    return os.path.join(folder, f"{top}.watched") if folder and top else None


def _record_found():
    """Tell the command's first Python process that a server was made (this one may be its child)."""
    path = _record_path()
    if path is not None:
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))
        except OSError:
            pass


def _at_exit_of_top(pid):
    if os.getpid() != pid:  # a forked child inherits the handler
        return
    path = _record_path()
    found = _state["found"]
    if path is not None:
        try:
            os.unlink(path)
            found = True
        except OSError:
            pass
    if not found:
        _say("loopwatch: watched nothing: %s created no MCP server (mcp Server, MCPServer or FastMCP)"
             % (os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "the command"))


def _install():
    finder = _ServerFinder(PATCH_POINTS)
    sys.meta_path.insert(0, finder)
    for name, classes in PATCH_POINTS.items():
        if name in sys.modules:  # imported before site ran (a .pth file): wrap it now
            _patch_module(sys.modules[name], classes)
    if os.environ.get(_TOP) is None:
        import atexit

        unseen = os.environ.get(_UNSEEN)
        if unseen:  # tell the launcher's watcher that a Python started (launch/_nothing.py)
            try:
                os.unlink(unseen)
            except OSError:
                pass
        os.environ[_TOP] = str(os.getpid())
        atexit.register(_at_exit_of_top, os.getpid())
        path = _record_path()
        if path is not None:  # left by an earlier process of this pid that was killed
            try:
                os.unlink(path)
            except OSError:
                pass


def _chain():
    """Import the `sitecustomize` this one hides (the next on sys.path), as Python would have. Through the
    import system's own frozen modules, always loaded: importing `importlib` here would cost every process."""
    bootstrap = sys.modules.get("_frozen_importlib")
    external = sys.modules.get("_frozen_importlib_external")
    if bootstrap is None or external is None:
        import importlib.machinery as external
        import importlib.util as bootstrap
    path = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]
    spec = external.PathFinder.find_spec("sitecustomize", path)
    if spec is None or spec.loader is None:
        return
    ours = sys.modules.get("sitecustomize")
    module = bootstrap.module_from_spec(spec)
    sys.modules["sitecustomize"] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules["sitecustomize"] = ours
        raise


if os.environ.get("LOOPWATCH_LAUNCH_OFF") != "1":
    try:
        _install()
    except Exception as _exc:
        _say(f"loopwatch: the start-up hook failed ({_exc}); the command runs unwatched")
_chain()
