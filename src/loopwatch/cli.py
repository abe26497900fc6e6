"""The `loopwatch` command: `run` wraps an existing server with no change to its code; `demo` shows it."""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from . import __version__
from ._options import CLI_OPTIONS, _flag, byte_size, positive_count

logger = logging.getLogger("loopwatch")

TRANSPORTS = ("stdio", "streamable-http", "sse")


class UsageError(Exception):
    pass


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, not {text}")
    return value


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"port must be 0-65535, not {value}")
    return value


def _policies(text: str) -> dict[str, str]:
    """`tool=never,other=always`."""
    result: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        tool, sep, policy = part.partition("=")
        if not sep or policy not in ("auto", "never", "always", "process"):
            raise argparse.ArgumentTypeError(f"{part!r}: expected TOOL=auto|never|always|process")
        result[tool] = policy
    return result


_SWITCH: dict[str, Any] = {"type": _flag, "nargs": "?", "const": True, "default": False, "metavar": "yes|no"}

# name, flags, kwargs: every option of `run`, each also read from LOOPWATCH_<NAME>.
RUN_OPTIONS: list[tuple[str, tuple[str, ...], dict[str, Any]]] = [
    ("transport", ("--transport",), {"choices": TRANSPORTS, "default": "stdio", "help": "how clients connect"}),
    ("host", ("--host",), {"default": "127.0.0.1", "help": "interface for HTTP transports"}),
    ("port", ("--port",), {"type": _port, "default": 8000, "help": "port for HTTP transports"}),
    ("threshold", ("--threshold",), {"type": _seconds, "default": 0.1, "help": "seconds of stall that count"}),
    ("offload", ("--offload",), {"choices": ("auto", "off"), "default": "auto",
                                 "help": "auto: tools caught blocking run their later calls off the loop"}),
    ("offload_state", ("--offload-state",), {"metavar": "FILE", "help": "remember offloaded tools across restarts"}),
    ("tool_policies", ("--offload-policy",), {"type": _policies, "default": {}, "metavar": "TOOL=POLICY,...",
                                              "help": "per tool: never (thread-affine), always, process, auto"}),
    ("strikes", ("--offload-strikes",), {"type": positive_count, "default": 1, "help": "blocks before a tool moves"}),
    ("offload_workers", ("--offload-workers",), {"type": positive_count, "default": 4,
                                                 "help": "loop threads for offloaded tools"}),
    ("offload_max_calls", ("--offload-max-calls",), {"type": positive_count, "default": 64,
                                                     "help": "offloaded calls in flight at once; more wait"}),
    ("offload_processes", ("--offload-processes",), {"type": positive_count, "default": 2,
                                                     "help": "worker processes for tools with policy process"}),
    ("offload_cpu", ("--offload-cpu",), {"choices": ("thread", "process"), "default": "thread",
                                         "help": "where a CPU-bound blocker moves by itself"}),
    ("offload_process_memory", ("--offload-process-memory",), {"type": positive_count, "metavar": "MIB",
                                                               "help": "address-space limit per worker process"}),
    ("events", ("--events",), {"metavar": "FILE", "help": "append every event as a JSON line"}),
    ("include_arguments", ("--include-arguments",), {**_SWITCH, "help": "tool argument values in block reports"}),
    ("monitor", ("--monitor",), {**_SWITCH, "help": "serve an aiomonitor console with lw- commands"}),
    ("monitor_host", ("--monitor-host",), {"default": "127.0.0.1", "help": "console interface"}),
    ("monitor_port", ("--monitor-port",), {"type": _port, "default": 20101, "help": "telnet; web UI +1, REPL +2"}),
    ("monitor_console", ("--monitor-console",), {**_SWITCH, "help": "aiomonitor's Python REPL: runs any code"}),
    ("monitor_allow_remote", ("--allow-remote-monitor",), {**_SWITCH, "help": "non-loopback console: no auth"}),
    ("metrics_port", ("--metrics-port",), {"type": _port, "help": "serve Prometheus /metrics on this port"}),
    ("metrics_host", ("--metrics-host",), {"default": "127.0.0.1", "help": "interface for --metrics-port"}),
    ("metrics_path", ("--metrics-path",), {"metavar": "PATH", "help": "route on the HTTP app: /metrics"}),
    *CLI_OPTIONS,
    ("no_announce", ("--no-announce",), {**_SWITCH, "help": "no private socket for `loopwatch top` to find"}),
]


def _env_name(flag: str) -> str:
    """`--offload-policy` reads LOOPWATCH_OFFLOAD_POLICY."""
    return "LOOPWATCH_" + flag.lstrip("-").replace("-", "_").upper()


def _add_run_options(parser: argparse.ArgumentParser) -> None:
    for name, flags, kwargs in RUN_OPTIONS:
        kwargs = dict(kwargs)
        env_name = _env_name(flags[0])
        env = os.environ.get(env_name)
        if env is not None:
            convert: Callable[[str], Any] = kwargs.get("type", str)
            try:
                kwargs["default"] = convert(env)
            except argparse.ArgumentTypeError as exc:
                raise UsageError(f"{env_name}={env}: {exc}") from None
            if "choices" in kwargs and kwargs["default"] not in kwargs["choices"]:
                choices = ", ".join(kwargs["choices"])
                raise UsageError(f"{env_name}={env}: expected one of {choices}")
        help_text = kwargs.pop("help", "")
        default = default_text(kwargs.get("default"), kwargs.get("type"))
        env_help = f"(env {env_name}" + (f"; default {default})" if default else ")")
        parser.add_argument(*flags, dest=name, help=f"{help_text} {env_help}".strip(), **kwargs)


def default_text(value: Any, kind: Any = None) -> str:
    """A default as `--help` shows it: as it is typed (yes/no, TOOL=POLICY, 50MB), nothing for unset ones."""
    if kind is byte_size and isinstance(value, int) and value and value % 1_000_000 == 0:
        return f"{value // 1_000_000}MB"
    if value is None or value == {}:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, dict):
        return ",".join(f"{key}={item}" for key, item in value.items())
    return str(value)


RUN_USAGE = "loopwatch run [OPTIONS] -- COMMAND [ARGS...]\n       loopwatch run [OPTIONS] TARGET"
RUN_DESCRIPTION = """\
Run a server the way its MCP client's config launches it, with every MCP server it creates watched:

  loopwatch run -- mcp-server-git --repository .
  loopwatch run --threshold 0.05 --metrics-port 9464 -- python server.py --flag
  loopwatch run -- uvx --with loopwatch --from mcp-server-time mcp-server-time

In a client's JSON config, put "loopwatch" in "command" and "run", "--" before the old command in "args":
  "command": "loopwatch", "args": ["run", "--", "mcp-server-git", "--repository", "."]

Or point at a server object: loopwatch run server.py[:object] (served over --transport)."""


def split_command(argv: Sequence[str]) -> tuple[list[str], list[str] | None]:
    """`run [OPTIONS] -- COMMAND...`: loopwatch's arguments and the command (None without `--`)."""
    argv = list(argv)
    if "--" not in argv or "run" not in argv[: argv.index("--")]:
        return argv, None
    cut = argv.index("--")
    return argv[:cut], argv[cut + 1 :]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loopwatch", description="Find what blocks an MCP server's event loop.")
    parser.add_argument("--version", action="version", version=f"loopwatch {__version__}")
    parser.add_argument("--debug", action="store_true", help="tracebacks and debug logs")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a server with loopwatch, no code change", usage=RUN_USAGE,
                         description=RUN_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    run.add_argument("target", nargs="?", help="path/to/server.py[:object] or package.module[:object]")
    run.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="tracebacks and debug logs")
    _add_run_options(run)
    demo = sub.add_parser("demo", help="run the bundled example and show what loopwatch finds")
    demo.add_argument("--quick", action="store_true", help="fewer calls")
    _add_viewer_commands(sub)
    return parser


def _add_viewer_commands(sub: Any) -> None:
    """`top`, `ls` and `report`: readers of the servers' announcements and of events files."""
    top = sub.add_parser("top", help="every watched server on this machine, live (the `top` extra)")
    top.add_argument("--once", action="store_true", help="print one plain-text snapshot and exit")
    top.add_argument("--interval", type=_seconds, default=0.5, help="seconds between looks (default 0.5)")
    sub.add_parser("ls", help="list the watched servers on this machine")
    report = sub.add_parser("report", help="blocks per tool, lines to fix, flame graphs")
    report.add_argument("events", nargs="*", help="events files (JSON lines, from --events; rotated ones too)")
    report.add_argument("--server", help="a running server instead: its name or pid (see `loopwatch ls`)")
    report.add_argument("--speedscope", metavar="FILE", help="write the blocked time as a speedscope profile")
    report.add_argument("--folded", metavar="FILE", help="write folded stacks (flamegraph.pl, inferno)")
    report.add_argument("--lines", type=positive_count, default=3, help="lines to fix shown per tool (default 3)")


def setup_logging(debug: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s loopwatch %(levelname)s %(message)s"))
    logger.handlers[:] = [handler]
    logger.setLevel(logging.DEBUG if debug else logging.INFO)
    logger.propagate = False


def main(argv: Sequence[str] | None = None) -> int:
    own, command = split_command(sys.argv[1:] if argv is None else argv)
    try:
        parser = build_parser()
        args, unknown = parser.parse_known_args(own)
        if unknown:  # the subcommand's usage, not the top one's: `run --bad -- CMD` shows the run form
            subcommand(parser, args.command).error(f"unrecognized arguments: {' '.join(unknown)}")
    except UsageError as exc:
        print(f"loopwatch: {exc}", file=sys.stderr)
        return 2
    setup_logging(getattr(args, "debug", False))
    if args.command == "demo":
        from .demo.driver import run_demo

        return run_demo(quick=args.quick)
    if args.command in ("top", "ls", "report"):
        from ._viewers import run_viewer

        return run_viewer(args)
    if command is not None or args.target is None:
        return launch_command(args, command, own)
    return run_command(args)


def subcommand(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return actions[0].choices[name] if actions and name in actions[0].choices else parser


def launch_command(args: argparse.Namespace, command: list[str] | None, given: Sequence[str] = ()) -> int:
    """`loopwatch run [OPTIONS] -- COMMAND [ARGS...]`: exec COMMAND with the start-up hook."""
    from .launch import NOT_PASSED, launch, option_text

    problem = None
    serving = sorted({a.split("=")[0] for a in given} & {"--transport", "--host", "--port", "--metrics-path"})
    if command and serving:  # loopwatch serves TARGET (and adds /metrics to its app); a command serves itself
        problem = (f"{', '.join(serving)}: for TARGET only; under -- the command serves as its own flags say "
                   "(metrics: --metrics-port)")
    elif command is None:
        problem = "expected TARGET, or -- COMMAND [ARGS...] (the server's command as its client runs it)"
    elif args.target is not None:
        problem = f"give TARGET or -- COMMAND, not both ({args.target} and -- {' '.join(command)})"
    elif not command:
        problem = "nothing after --: give the server's command, e.g. -- mcp-server-git --repository ."
    if problem is not None:
        print(f"usage: {RUN_USAGE}\nloopwatch run: error: {problem}", file=sys.stderr)
        return 2
    refused = refused_option(args)
    if refused is not None:  # the line and the exit status `run TARGET` gives, before the command runs
        print(f"loopwatch: {refused}", file=sys.stderr)
        return 2
    values = vars(args)
    options = {}
    for name, flags, _ in RUN_OPTIONS:
        if name not in NOT_PASSED:
            value = values[name]
            if name in ("events", "offload_state") and value:
                value = os.path.abspath(value)  # the command may change directory
            options[_env_name(flags[0])] = option_text(value)
    return launch(command, options, debug=args.debug)


def refused_option(args: argparse.Namespace) -> str | None:
    """What `instrument()` refuses at start, checked by the launcher before its exec, as `run TARGET` checks it:
    a value out of range, an events file that cannot be appended to (created, as a watched server creates it),
    an offload state file in no folder, a console on a remote address. An integration missing from this Python
    is not refused: the command's own Python may have it."""
    from ._events import JsonLinesWriter
    from ._options import OptionError, Options, check_state_folder

    try:
        options = Options.build(**run_options(args))
        if options.events:
            JsonLinesWriter(options.events)
        if options.offload_state:
            check_state_folder(options.offload_state)
        if options.monitor:
            from .aiomonitor import check_options

            check_options(options)
    except (OptionError, OSError) as exc:
        return str(exc)
    return None


def run_options(args: argparse.Namespace) -> dict[str, Any]:
    """What `instrument()` gets from the command line."""
    return {
        "threshold": args.threshold,
        "offload": args.offload,
        "offload_state": args.offload_state,
        "tool_policies": args.tool_policies,
        "strikes": args.strikes,
        "offload_workers": args.offload_workers,
        "offload_max_calls": args.offload_max_calls,
        "offload_processes": args.offload_processes,
        "offload_cpu": args.offload_cpu,
        "offload_process_memory": args.offload_process_memory,
        "events": args.events,
        "include_arguments": args.include_arguments,
        "monitor": args.monitor,
        "monitor_host": args.monitor_host,
        "monitor_port": args.monitor_port,
        "monitor_console": args.monitor_console,
        "monitor_allow_remote": args.monitor_allow_remote,
        "metrics_port": args.metrics_port,
        "metrics_host": args.metrics_host,
        "metrics_path": args.metrics_path,
        **{name: getattr(args, name) for name, _, _ in CLI_OPTIONS},
        "announce": not args.no_announce,
    }


def run_command(args: argparse.Namespace) -> int:
    from ._options import OptionError
    from ._target import TargetError, load_target, serve
    from .mcp import instrument

    try:
        server = load_target(args.target)
        from .otel import configure_from_env  # after the import: a provider the program set is kept

        configure_from_env(service_name=getattr(server, "name", None))
        handle = instrument(server, **run_options(args))
        handle.transport = args.transport
    except (TargetError, OptionError, OSError, ImportError) as exc:  # ImportError: an extra is missing
        if args.debug:
            logger.exception("cannot start")
        print(f"loopwatch: {exc}", file=sys.stderr)
        return 2
    import anyio

    threshold_ms = args.threshold * 1000

    def listening(url: str) -> None:  # over HTTP: once the port is bound (--port 0 picks one), with the URL
        if handle.adapter.supported:
            logger.info("watching %s over %s at %s (threshold %.0f ms)", args.target, args.transport, url,
                        threshold_ms)

    if handle.adapter.supported and args.transport == "stdio":  # else instrument() said why it runs unwatched
        logger.info("watching %s over %s (threshold %.0f ms)", args.target, args.transport, threshold_ms)
    if args.metrics_path and args.transport == "stdio":
        logger.warning("--metrics-path %s is ignored under stdio (there is no HTTP app to add it to): "
                       "use --metrics-port", args.metrics_path)
    try:
        anyio.run(serve, server, args.transport, args.host, args.port, handle.routes, listening)
    except KeyboardInterrupt:
        raise  # as from the bare server: Python ends the process by the signal itself (a shell sees SIGINT)
    except Exception as exc:
        if args.debug:
            logger.exception("the server failed")
        print(f"loopwatch: the server failed: {failure_text(exc)}", file=sys.stderr)
        return 1
    finally:
        handle.uninstrument()
    return 0


def failure_text(exc: BaseException) -> str:
    """What the server raised, out of the task groups' ExceptionGroups that wrap it on the way up."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    if isinstance(exc, BaseExceptionGroup):
        return "; ".join(failure_text(inner) for inner in exc.exceptions)
    return f"{type(exc).__name__}: {exc}"
