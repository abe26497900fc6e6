"""What an idle stdio server costs: bare against the same server under `loopwatch run`, from /proc.

    python benchmarks/bench_idle.py [--rounds 3] [--seconds 15]

Each round starts the configurations side by side (the bare server, `loopwatch run` on it with its
defaults, and the bare server again for the A/A line), does the MCP initialize handshake and one tools/list
with each over its stdin/stdout, lets them settle for two seconds, then reads every process's threads from
/proc over the same `--seconds` window: wake-ups (voluntary plus involuntary context switches, summed over
/proc/PID/task/*/status) and CPU (on-CPU nanoseconds from /proc/PID/task/*/schedstat; /proc/PID/stat's
utime+stime ticks, 10 ms each, are printed beside them). Idle is the state between a desktop client's
requests: the server waits on stdin with nothing in flight. Linux only.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

SERVER = Path(__file__).with_name("idle_server.py")
TICKS = os.sysconf("SC_CLK_TCK")


def commands() -> dict[str, list[str]]:
    loopwatch = shutil.which("loopwatch", path=str(Path(sys.executable).parent)) or "loopwatch"
    return {
        "bare": [sys.executable, str(SERVER)],
        "loopwatch": [loopwatch, "run", str(SERVER)],
        "bare-again": [sys.executable, str(SERVER)],
    }


def start(command: list[str]) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    init = {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "bench", "version": "0"}}
    send(proc, {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": init})
    receive(proc)
    send(proc, {"jsonrpc": "2.0", "method": "notifications/initialized"})
    send(proc, {"jsonrpc": "2.0", "id": 2, "method": "tools/list"})
    reply = receive(proc)
    assert reply.get("id") == 2 and "result" in reply, reply
    return proc


def send(proc: subprocess.Popen[bytes], message: dict) -> None:
    assert proc.stdin is not None
    proc.stdin.write(json.dumps(message).encode() + b"\n")
    proc.stdin.flush()


def receive(proc: subprocess.Popen[bytes]) -> dict:
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        raise RuntimeError(f"the server {proc.args} closed its stdout")
    return json.loads(line)


def read(pid: int) -> tuple[int, int, int]:
    """(context switches, on-CPU ns, utime+stime ticks) of every thread of the process."""
    switches = cpu_ns = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/status") as status:
                for line in status:
                    if "ctxt_switches" in line:  # voluntary_ and nonvoluntary_
                        switches += int(line.split()[1])
            with open(f"/proc/{pid}/task/{task}/schedstat") as schedstat:
                cpu_ns += int(schedstat.read().split()[0])
        except (FileNotFoundError, ProcessLookupError):  # a thread that ended meanwhile
            continue
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return switches, cpu_ns, int(fields[11]) + int(fields[12])


def one_round(seconds: float) -> dict[str, tuple[float, float, float]]:
    procs = {name: start(command) for name, command in commands().items()}
    try:
        time.sleep(2.0)
        before = {name: read(p.pid) for name, p in procs.items()}
        started = time.monotonic()
        time.sleep(seconds)
        after = {name: read(p.pid) for name, p in procs.items()}
        elapsed = time.monotonic() - started
    finally:
        for proc in procs.values():
            assert proc.stdin is not None
            proc.stdin.close()
        for proc in procs.values():
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
    result = {}
    for name in procs:
        (s0, c0, t0), (s1, c1, t1) = before[name], after[name]
        result[name] = ((s1 - s0) / elapsed, (c1 - c0) / 1e9 / elapsed * 100, (t1 - t0) / TICKS / elapsed * 100)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=15.0)
    args = parser.parse_args()
    rounds = [one_round(args.seconds) for _ in range(args.rounds)]
    print(f"{args.rounds} rounds x {args.seconds:.0f} s of an idle stdio server (all configurations side by side)")
    for name in rounds[0]:
        wakeups = [r[name][0] for r in rounds]
        cpu = [r[name][1] for r in rounds]
        ticks = [r[name][2] for r in rounds]
        label = "A/A: bare again" if name == "bare-again" else name
        print(
            f"{label:<16} wake-ups/s median {statistics.median(wakeups):6.2f} ({min(wakeups):.2f}-{max(wakeups):.2f})"
            f"  CPU % of a core median {statistics.median(cpu):.4f} ({min(cpu):.4f}-{max(cpu):.4f})"
            f"  [/proc/PID/stat ticks: {statistics.median(ticks):.3f}%]"
        )


if __name__ == "__main__":
    main()
