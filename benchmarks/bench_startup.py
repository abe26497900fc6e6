"""Start-up cost of `loopwatch run -- COMMAND`'s hook in a Python process that creates no MCP server.

    python benchmarks/bench_startup.py [--rounds 40]

Every Python process of a watched command runs the hook (`sitecustomize` on PYTHONPATH, the options in
LOOPWATCH_* variables); most of them (a tool's helper scripts, `pip`, a child that serves nothing) never make a
server. Each round starts, in a shuffled order, the same program bare, with the hook's environment, and bare
again (the A/A line: how far apart two identical configurations land on this machine in this run), and times
each process from spawn to exit. Two programs: `pass` (the interpreter alone) and one that imports the SDK's
server modules (where the hook wraps the server classes) but makes no server. Prints the median time of each
and the median of the per-round ratios against bare, with a 95% bootstrap interval of that median; the
target is a hook ratio inside the A/A noise. On a busy machine a process's start and exit vary by more than
the hook costs, so its own cost is measured first, inside the process: the import time of `sitecustomize`
(`-X importtime`), the hook's against bare Python's search for one. The launcher itself (`loopwatch run --`,
a Python process that execs the command) is timed once per round too, for scale: that is paid once per
launch, not per process.
"""

from __future__ import annotations

import argparse
import compileall
import os
import random
import statistics
import subprocess
import sys
import time

from loopwatch.launch import BOOT_DIR, hook_env

PROGRAMS = {
    "pass": "pass",
    "imports mcp": "import mcp.server.lowlevel.server, mcp.server.mcpserver",
}


def spawn_seconds(argv: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    subprocess.run(argv, env=env, check=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def sitecustomize_microseconds(env: dict[str, str]) -> int:
    """The cumulative import time of `sitecustomize` in one process (`-X importtime`): the hook itself (and the
    one it chains to), or bare Python's search for one, without the interpreter's start and exit around it,
    which swamp a fraction of a millisecond on a busy machine."""
    done = subprocess.run([sys.executable, "-X", "importtime", "-c", "pass"], env=env, capture_output=True,
                          text=True, check=True, stdin=subprocess.DEVNULL)
    for line in done.stderr.splitlines():
        parts = [p.strip() for p in line.removeprefix("import time:").split("|")]
        if len(parts) == 3 and parts[2] == "sitecustomize":
            return int(parts[1])
    raise RuntimeError("no `sitecustomize` line in -X importtime output")


def bootstrap_median(values: list[float], draws: int = 2000) -> tuple[float, float]:
    rng = random.Random(1)
    medians = sorted(statistics.median(rng.choices(values, k=len(values))) for _ in range(draws))
    return medians[int(draws * 0.025)], medians[int(draws * 0.975)]


def ratio_line(label: str, ratios: list[float]) -> str:
    low, high = bootstrap_median(ratios)
    return f"  {label:<34} ratio {statistics.median(ratios):.3f}  (95% CI {low:.3f}-{high:.3f})"


def main(rounds: int) -> None:
    # As installed from a wheel: the hook's bytecode compiled (pip does it at install), and written for both.
    compileall.compile_dir(BOOT_DIR, quiet=1)
    bare_env = {k: v for k, v in os.environ.items() if not k.startswith("LOOPWATCH_")}
    bare_env.pop("PYTHONDONTWRITEBYTECODE", None)
    hooked_env = hook_env(bare_env, {"LOOPWATCH_THRESHOLD": "0.1", "LOOPWATCH_OFFLOAD": "auto"})
    print(f"python {sys.version.split()[0]}, {rounds} rounds, order shuffled per round")
    envs = {"bare": bare_env, "hook": hooked_env, "bare again": bare_env}
    site: dict[str, list[float]] = {label: [] for label in envs}
    for _ in range(rounds):
        order = list(envs)
        random.shuffle(order)
        for label in order:
            site[label].append(sitecustomize_microseconds(envs[label]))
    print("\nimporting sitecustomize in python -c 'pass' (-X importtime): the hook, or bare Python's search")
    for label, values in site.items():
        print(f"  {label:<34} median {statistics.median(values) / 1000:7.2f} ms")
    median = {label: statistics.median(values) / 1000 for label, values in site.items()}
    print(f"  hook - bare {median['hook'] - median['bare']:+.2f} ms"
          f"   (A/A, bare again - bare: {median['bare again'] - median['bare']:+.2f} ms)")
    for name, code in PROGRAMS.items():
        argv = [sys.executable, "-c", code]
        configs = {"bare": (argv, bare_env), "hook": (argv, hooked_env), "bare again": (argv, bare_env)}
        if name == "pass":
            launcher = [sys.executable, "-m", "loopwatch", "run", "--", *argv]
            configs["loopwatch run -- (launcher)"] = (launcher, bare_env)
        for args, env in configs.values():  # warm the page cache and the .pyc files
            spawn_seconds(args, env)
        times: dict[str, list[float]] = {label: [] for label in configs}
        for _ in range(rounds):
            order = list(configs)
            random.shuffle(order)
            for label in order:
                times[label].append(spawn_seconds(*configs[label]))
        print(f"\n{name}: python -c {code!r}")
        for label, values in times.items():
            print(f"  {label:<34} median {statistics.median(values) * 1000:7.1f} ms")
        for label in configs:
            if label != "bare":
                ratios = [t / b for t, b in zip(times[label], times["bare"], strict=True)]
                print(ratio_line(f"{label} / bare", ratios))


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=40)
    main(parser.parse_args().rounds)
