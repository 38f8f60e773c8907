"""Latency, idle cost and memory of watch_deploy.py.

Figures, each from the real watcher (this Python, inotify_simple) on a temp
folder, with a deploy command that only appends its start time (a shell
running `date +%s.%N`), so the figure is the watcher's own reaction time:
  latency  time from writing a trigger to the deploy command's start,
           median and worst of --samples, for the contract's write (a temp
           file, then a rename) and the procedure's in-place write;
           baseline in the same run: the procedure's `inotifywait -m -e create
           -e modify` loop (skipped when inotify-tools is not installed),
           which deploys on the first of its events;
  idle     CPU time and wakeups (voluntary + involuntary context switches)
           of an idle watcher over --idle-seconds, in inotify mode and with
           --poll 1 for comparison, measured side by side;
  memory   the idle watcher's resident memory (VmRSS).

Output: one line per figure on stdout, tab-separated:
<area> <metric> <value> <target> <ok|MISSED>; progress on stderr.
Exit status: 0 when it ran (even if a target is missed), 1 if a watcher
would not start or a deploy never came, 2 on bad usage.
"""

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WATCHER = ROOT / "watch_deploy.py"
AREA = "watch_deploy"
TRIGGER_NAME = "deploy_trigger.txt"
TRIGGER = '{"ref":"refs/heads/main","after":"' + "a" * 40 + '","delivery":"bench"}\n'
LATENCY_TARGET_MS = 10.0
WAKEUPS_TARGET = 0
RSS_TARGET_MB = 20.0
START_SECONDS = 10  # for a watcher to start watching
DEPLOY_SECONDS = 5  # for a deploy to start after a write
SETTLE_SECONDS = 0.05  # between two samples, so that no deploy is still running
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")

STUB = '#!/bin/sh\ndate +%s.%N >> "$BENCH_STARTS"\n'

# The procedure's watcher loop (PROCEDURE.md, step 5) without its lock file
# and its logging: what reacts to the trigger.
PROCEDURE_LOOP = """\
inotifywait -m -e create -e modify "$WATCH_DIR" | while read path action file; do
    if [ "$file" = "deploy_trigger.txt" ]; then
        [ -f "$WATCH_DIR/deploy_trigger.txt" ] && rm -f "$WATCH_DIR/deploy_trigger.txt"
        "$DEPLOY_SCRIPT" >/dev/null 2>&1
    fi
done
"""


class BenchError(Exception):
    pass


def log(message):
    print(message, file=sys.stderr, flush=True)


def row(metric, value, target="-", ok=True):
    print(f"{AREA}\t{metric}\t{value}\t{target}\t{'ok' if ok else 'MISSED'}", flush=True)


class Folder:
    """A watch folder, the stub deploy and its log of start times."""

    def __init__(self, root, name):
        self.path = root / name
        self.path.mkdir()
        self.trigger = self.path / TRIGGER_NAME
        self.starts = root / f"{name}.starts"
        self.starts.touch()
        self.stub = root / f"{name}-deploy.sh"
        self.stub.write_text(STUB)
        self.stub.chmod(0o755)
        self.env = dict(os.environ, BENCH_STARTS=str(self.starts))
        for name in [name for name in self.env if name.startswith("DEPLOY_")]:
            del self.env[name]

    def start_times(self):
        return [float(line) for line in self.starts.read_text().split()]

    def write(self, in_place):
        if in_place:
            with open(self.trigger, "w") as trigger:
                trigger.write(TRIGGER)
        else:
            temp = self.path / ".deploy_trigger.txt.tmp"
            temp.write_text(TRIGGER)
            os.replace(temp, self.trigger)


def start_watcher(folder, *args):
    log_path = folder.path.with_suffix(".log")
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen(
            [
                sys.executable,
                str(WATCHER),
                "--watch-dir",
                str(folder.path),
                "--deploy-command",
                str(folder.stub),
                *args,
            ],
            env=folder.env,
            stdout=subprocess.DEVNULL,
            stderr=log_file,
        )
    wait_for(lambda: "watching " in log_path.read_text() or proc.poll() is not None, START_SECONDS)
    if proc.poll() is not None:
        raise BenchError(f"the watcher would not start: {log_path.read_text().strip()}")
    return proc


def start_procedure_loop(folder):
    env = dict(folder.env, WATCH_DIR=str(folder.path), DEPLOY_SCRIPT=str(folder.stub))
    messages = folder.path.with_suffix(".log")
    with open(messages, "w") as stderr:
        proc = subprocess.Popen(
            ["sh", "-c", PROCEDURE_LOOP], env=env, stderr=stderr, start_new_session=True
        )
    if not wait_for(lambda: "Watches established" in messages.read_text(), START_SECONDS):
        stop(proc, group=True)
        raise BenchError(
            f"the procedure's inotifywait loop would not start: {messages.read_text().strip()}"
        )
    return proc


def stop(proc, group=False):
    if proc.poll() is None:
        if group:
            os.killpg(proc.pid, signal.SIGTERM)
        else:
            proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=START_SECONDS)


def wait_for(condition, seconds):
    """Poll gently: a busy loop here would take the CPU the watcher needs.
    Latencies come from the deploy's own start time, not from this loop."""
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


def latencies(folder, samples, in_place):
    """Milliseconds from each write to the next deploy start."""
    results = []
    for _ in range(samples):
        seen = len(folder.start_times())
        written = time.time()
        folder.write(in_place)
        if not wait_for(lambda: len(folder.start_times()) > seen, DEPLOY_SECONDS):
            raise BenchError(f"no deploy within {DEPLOY_SECONDS} s of a write to {folder.path}")
        results.append((folder.start_times()[seen] - written) * 1000)
        wait_for(lambda: not os.path.lexists(folder.trigger), DEPLOY_SECONDS)
        time.sleep(SETTLE_SECONDS)
    return results


def latency_rows(label, times, target=None):
    median = statistics.median(times)
    if target is None:
        row(f"trigger-to-deploy-start median, {label}", f"{median:.2f} ms")
    else:
        row(
            f"trigger-to-deploy-start median, {label}",
            f"{median:.2f} ms",
            f"< {target:g} ms",
            median < target,
        )
    row(f"trigger-to-deploy-start worst of {len(times)}, {label}", f"{max(times):.2f} ms")
    return median


def process_counters(pid):
    """(CPU seconds, context switches) used so far by the process."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime, stime
    switches = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(("voluntary_ctxt_switches:", "nonvoluntary_ctxt_switches:")):
            switches += int(line.split()[1])
    return cpu, switches


def resident_mb(pid):
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise BenchError(f"no VmRSS for {pid}")


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--samples", type=int, default=50, help="writes per latency figure (default 50)"
    )
    parser.add_argument("--idle-seconds", type=float, default=30.0, help="idle window (default 30)")
    return parser


def check_args(parser, args):
    if args.samples < 1 or args.idle_seconds <= 0:
        parser.error("--samples must be at least 1 and --idle-seconds above 0")


def run(root, args):
    inotify_folder = Folder(root, "inotify")
    poll_folder = Folder(root, "poll")
    watcher = start_watcher(inotify_folder)
    poller = start_watcher(poll_folder, "--poll", "1")
    try:
        log(f"latency: {args.samples} writes by rename, then {args.samples} in place")
        median = latency_rows(
            "write by rename",
            latencies(inotify_folder, args.samples, in_place=False),
            LATENCY_TARGET_MS,
        )
        latency_rows(
            "write in place",
            latencies(inotify_folder, args.samples, in_place=True),
            LATENCY_TARGET_MS,
        )
        if shutil.which("inotifywait"):
            baseline_folder = Folder(root, "baseline")
            loop = start_procedure_loop(baseline_folder)
            try:
                base = latency_rows(
                    "inotifywait loop, write in place",
                    latencies(baseline_folder, args.samples, in_place=True),
                )
            finally:
                stop(loop, group=True)
            row("median / inotifywait loop's", f"{median / base:.2f}x")
        else:
            log("inotifywait not installed (inotify-tools): no baseline row")

        log(f"idle: {args.idle_seconds:g} s")
        before = {proc.pid: process_counters(proc.pid) for proc in (watcher, poller)}
        time.sleep(args.idle_seconds)
        after = {proc.pid: process_counters(proc.pid) for proc in (watcher, poller)}
        window = f"{args.idle_seconds:g} s"
        for proc, mode, target in (
            (watcher, "inotify", WAKEUPS_TARGET),
            (poller, "--poll 1", None),
        ):
            cpu = (after[proc.pid][0] - before[proc.pid][0]) * 1000
            wakeups = after[proc.pid][1] - before[proc.pid][1]
            row(f"idle CPU time over {window}, {mode}", f"{cpu:.0f} ms")
            if target is None:
                row(f"idle wakeups over {window}, {mode}", str(wakeups))
            else:
                row(
                    f"idle wakeups over {window}, {mode}",
                    str(wakeups),
                    str(target),
                    wakeups <= target,
                )
        rss = resident_mb(watcher.pid)
        row(
            "resident memory (VmRSS), idle, inotify",
            f"{rss:.1f} MB",
            f"< {RSS_TARGET_MB:g} MB",
            rss < RSS_TARGET_MB,
        )
    finally:
        stop(watcher)
        stop(poller)


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)
    try:
        with tempfile.TemporaryDirectory(prefix="bench-watch-") as workdir:
            run(Path(workdir), args)
    except BenchError as error:
        log(f"error: {error}")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
