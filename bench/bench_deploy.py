"""What deploy.py costs on top of the commands it runs.

(a) An up-to-date run (the redelivered webhook) against a plain `git fetch`
    of the same checkout, from a local bare origin: medians of RUNS runs each,
    interleaved, and their ratio.
(b) A full deploy (fetch, checks, build, up, prune) with a fake docker that
    answers at once: the run's wall time minus the wall time of every child
    command it ran, timed around deploy.run, the one place children are
    started. Python's start-up and imports count as the tool's overhead.

Real git in a temp folder; the fake docker is a two-line sh script first on
PATH. Prints tab-separated rows: area, metric, value, target, ok|MISSED;
details go to stderr.
"""

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RUNS = 20  # up-to-date runs, and fetches
DEPLOYS = 10  # full deploys
TARGET_RATIO = 1.3  # up-to-date run / git fetch
TARGET_OVERHEAD = 0.150  # seconds beyond the child commands, per full deploy

FAST_DOCKER = """#!/bin/sh
case "$*" in
*"up --help"*) echo "      --wait    Wait for services to be running|healthy" ;;
*version*) echo "Docker Compose version v2.40.3" ;;
esac
"""

# Runs deploy.main with deploy.run timed; writes the children's total seconds to argv[1].
TIMED_DEPLOY = """
import sys, time
sys.path.insert(0, sys.argv[1])
import deploy
spent = []
untimed = deploy.run
def run(*args, **kwargs):
    started = time.perf_counter()
    try:
        return untimed(*args, **kwargs)
    finally:
        spent.append(time.perf_counter() - started)
deploy.run = run
status = deploy.main(sys.argv[3:])
with open(sys.argv[2], "w") as out:
    out.write(repr(sum(spent)))
sys.exit(status)
"""


class Setup:
    """A bare origin, a developer's clone, the app's checkout, a fast fake docker."""

    def __init__(self, root):
        self.root = root
        self.origin, self.dev, self.app = root / "origin.git", root / "dev", root / "app"
        (root / "home").mkdir()
        (root / "bin").mkdir()
        docker = root / "bin" / "docker"
        docker.write_text(FAST_DOCKER)
        docker.chmod(0o755)
        self.env = dict(
            os.environ,
            PATH=f"{root / 'bin'}{os.pathsep}{os.environ['PATH']}",
            HOME=str(root / "home"),
            GIT_CONFIG_NOSYSTEM="1",
            GIT_AUTHOR_NAME="Bench",
            GIT_AUTHOR_EMAIL="bench@example.invalid",
            GIT_COMMITTER_NAME="Bench",
            GIT_COMMITTER_EMAIL="bench@example.invalid",
        )
        for name in [name for name in self.env if name.startswith("DEPLOY_")]:
            del self.env[name]
        self.git("init", "-q", "--bare", "-b", "main", str(self.origin), cwd=root)
        self.git("clone", "-q", str(self.origin), str(self.dev), cwd=root)
        (self.dev / "web").mkdir()
        (self.dev / "docker-compose.yml").write_text("services:\n  web:\n    build: web\n")
        self.push({"web/Dockerfile": "FROM scratch\n", "app.txt": "0\n"}, "first")
        self.git("clone", "-q", str(self.origin), str(self.app), cwd=root)

    def git(self, *args, cwd):
        subprocess.run(["git", *args], cwd=cwd, env=self.env, check=True, capture_output=True)

    def push(self, files, message):
        for name, text in files.items():
            (self.dev / name).write_text(text)
        self.git("add", "-A", cwd=self.dev)
        self.git("commit", "-q", "-m", message, cwd=self.dev)
        self.git("push", "-q", "origin", "main", cwd=self.dev)

    def deploy_argv(self):
        return [sys.executable, str(ROOT / "deploy.py"), "--app-dir", str(self.app)]


def wall(argv, env, cwd=None):
    started = time.perf_counter()
    result = subprocess.run(
        argv, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"`{' '.join(argv)}` failed: {result.stderr.decode(errors='replace')}")
    return seconds


def up_to_date_against_fetch(setup):
    wall(setup.deploy_argv(), setup.env)  # the first deploy, so that the next ones are up to date
    ours, fetches = [], []
    for _ in range(RUNS):
        ours.append(wall(setup.deploy_argv(), setup.env))
        fetches.append(wall(["git", "fetch"], setup.env, cwd=setup.app))
    return statistics.median(ours), statistics.median(fetches)


def overhead_of_full_deploys(setup):
    children_file = setup.root / "children"
    overheads = []
    for number in range(DEPLOYS):
        setup.push(
            {"web/Dockerfile": f"FROM scratch\n# {number}\n", "app.txt": f"{number}\n"},
            f"change {number}",
        )
        argv = [
            sys.executable,
            "-c",
            TIMED_DEPLOY,
            str(ROOT),
            str(children_file),
            "--app-dir",
            str(setup.app),
        ]
        total = wall(argv, setup.env)
        children = float(children_file.read_text())
        overheads.append(total - children)
        print(
            f"full deploy {number}: {total * 1000:.0f} ms, children {children * 1000:.0f} ms",
            file=sys.stderr,
        )
    return statistics.median(overheads)


def row(metric, value, target, ok):
    print(f"deploy\t{metric}\t{value}\t{target}\t{'ok' if ok else 'MISSED'}")


def main():
    with tempfile.TemporaryDirectory(prefix="bench-deploy-") as workdir:
        setup = Setup(Path(workdir))
        ours, fetch = up_to_date_against_fetch(setup)
        overhead = overhead_of_full_deploys(setup)
        log = setup.app / ".git" / "webhook-deploy" / "history.jsonl"
        results = [json.loads(line)["result"] for line in log.read_text().splitlines()]
        if results != ["deployed"] * (DEPLOYS + 1):
            raise SystemExit(f"unexpected deploy results: {results}")
    ratio = ours / fetch
    print(
        f"up-to-date run {ours * 1000:.1f} ms, git fetch {fetch * 1000:.1f} ms"
        f" (medians of {RUNS}); {(ours - fetch) * 1000:.1f} ms more;"
        f" Python {sys.version.split()[0]}",
        file=sys.stderr,
    )
    row(
        f"up-to-date run / plain git fetch, local origin (median of {RUNS})",
        f"{ratio:.2f}x ({ours * 1000:.0f} ms vs {fetch * 1000:.0f} ms)",
        f"<= {TARGET_RATIO}x",
        ratio <= TARGET_RATIO,
    )
    row(
        f"own overhead of a full deploy beyond its commands (median of {DEPLOYS})",
        f"{overhead * 1000:.0f} ms",
        f"< {TARGET_OVERHEAD * 1000:.0f} ms",
        overhead < TARGET_OVERHEAD,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
