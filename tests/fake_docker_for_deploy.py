"""A stand-in for `docker` and `docker-compose`, for deploy.py's tests and benchmark.

Installed by `install(bin_dir)` as both names. Each call appends two JSON
lines to $FAKE_DOCKER_LOG: {"event": "start", "pid", "argv", "cwd", "time",
"app"} (argv[0] is the program's name, "app" the content of app.txt in the
working folder, if any) and {"event": "end", "pid", "time", "rc"}.

It answers `docker compose version`, `docker-compose version`,
`... up --help` (listing --wait for the v2 plugin only) and `docker compose
config --format json` (the project's name; v1 has no --format); `build`, `up` and
`docker image prune` print a line and succeed, unless told otherwise:

  FAKE_DOCKER_FAIL   comma-separated: build, up, prune (those fail), plugin
                     (`docker compose` is not a docker command), v1
                     (`docker-compose` is not installed)
  FAIL_BUILD, FAIL_UP  files in the working folder: build or up fail there
                     (a commit that breaks the build or the start)
  FAKE_DOCKER_BUILD_SECONDS  build sleeps this long after its first line
  FAKE_DOCKER_BUILD_UNTIL    build waits until this file exists
  FAKE_DOCKER_UP_UNTIL       up waits until this file exists
  FAKE_DOCKER_LINGER  up leaves a `sleep 30` behind that holds its stdout and
                     stderr open (as ssh's ControlMaster does), and writes
                     that process's pid into this file
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

V2_UP_HELP = """Usage:  docker compose up [OPTIONS] [SERVICE...]

Create and start containers

Options:
  -d, --detach                 Detached mode: Run containers in the background
      --force-recreate         Recreate containers even if their configuration and image haven't changed
      --remove-orphans         Remove containers for services not defined in the Compose file
      --wait                   Wait for services to be running|healthy. Implies detached mode.
      --wait-timeout int       Maximum duration in seconds to wait for the project to be running|healthy
"""
V1_UP_HELP = """Builds, (re)creates, starts, and attaches to containers for a service.

Usage: up [options] [--scale SERVICE=NUM...] [--] [SERVICE...]

Options:
    -d, --detach               Detached mode: Run containers in the background
    --force-recreate           Recreate containers even if their configuration and image haven't changed.
    --remove-orphans           Remove containers for services not defined in the Compose file.
"""


def note(**fields):
    with open(os.environ["FAKE_DOCKER_LOG"], "a", encoding="utf-8") as log:
        log.write(json.dumps(fields) + "\n")


def say(text, stream=sys.stdout):
    print(text, file=stream, flush=True)


def wait_for_file(variable):
    """Block until the file named by $variable exists (no wait when it is unset)."""
    until = os.environ.get(variable)
    while until and not os.path.exists(until):
        time.sleep(0.05)


def compose(program, args, fail):
    """Act as the compose command; return the exit status."""
    words = list(args)
    while words and words[0] in ("-f", "--file", "--project-directory"):
        del words[:2]
    command = words[0] if words else ""
    here = Path.cwd()
    if command == "version":
        say(
            "Docker Compose version v2.40.3"
            if program == "docker"
            else "docker-compose version 1.29.2"
        )
        return 0
    if command == "up" and "--help" in words:
        say(V2_UP_HELP if program == "docker" else V1_UP_HELP)
        return 0
    if command == "config" and "--format" in words:
        if program != "docker":
            say("No such option: --format", sys.stderr)
            return 1
        # As Compose v2 names a project: after its folder.
        say(json.dumps({"name": here.name.lower(), "services": {}}))
        return 0
    if command == "build":
        say("#1 building web")
        seconds = float(os.environ.get("FAKE_DOCKER_BUILD_SECONDS", "0"))
        if seconds:
            time.sleep(seconds)
        wait_for_file("FAKE_DOCKER_BUILD_UNTIL")
        if "build" in fail or (here / "FAIL_BUILD").exists():
            say("failed to solve: process did not complete successfully: exit code: 1", sys.stderr)
            return 17
        say("#2 naming to docker.io/library/app-web done")
        return 0
    if command == "up":
        wait_for_file("FAKE_DOCKER_UP_UNTIL")
        if "up" in fail or (here / "FAIL_UP").exists():
            say("container app-web-1 is unhealthy", sys.stderr)
            return 1
        say("Container app-web-1 Started")
        linger = os.environ.get("FAKE_DOCKER_LINGER")
        if linger:
            sleeper = subprocess.Popen(["sleep", "30"], stdin=subprocess.DEVNULL)
            Path(linger).write_text(str(sleeper.pid))
        return 0
    say(f"fake docker: unexpected compose command {args}", sys.stderr)
    return 99


def main():
    program = os.path.basename(sys.argv[0])
    args = sys.argv[1:]
    fail = set(os.environ.get("FAKE_DOCKER_FAIL", "").split(","))
    app = Path("app.txt")
    note(
        event="start",
        pid=os.getpid(),
        argv=[program, *args],
        cwd=os.getcwd(),
        time=time.time(),
        app=app.read_text() if app.is_file() else None,
    )
    if program == "docker-compose":
        rc = 127 if "v1" in fail else compose(program, args, fail)
    elif args[:1] == ["compose"]:
        if "plugin" in fail:
            say("docker: 'compose' is not a docker command.", sys.stderr)
            rc = 1
        else:
            rc = compose(program, args[1:], fail)
    elif args[:2] == ["image", "prune"]:
        rc = 1 if "prune" in fail else 0
        say("Error response from daemon: prune failed" if rc else "Total reclaimed space: 0B")
    else:
        say(f"fake docker: unexpected command {args}", sys.stderr)
        rc = 99
    note(event="end", pid=os.getpid(), time=time.time(), rc=rc)
    return rc


def install(bin_dir, python=sys.executable):
    """Put `docker` and `docker-compose` into bin_dir, run by `python`."""
    bin_dir = Path(bin_dir)
    bin_dir.mkdir(parents=True, exist_ok=True)
    for name in ("docker", "docker-compose"):
        path = bin_dir / name
        path.write_text(f"#!{python} -S\n" + Path(__file__).read_text())
        path.chmod(0o755)


def calls(log_path):
    """The calls logged, in start order: dicts with argv, cwd, app, pid, start, end, rc."""
    path = Path(log_path)
    if not path.exists():
        return []
    started, ended = [], {}
    for line in path.read_text().splitlines():
        event = json.loads(line)
        if event["event"] == "start":
            started.append(event)
        else:
            ended[event["pid"]] = event
    result = []
    for event in started:
        end = ended.get(event["pid"], {})
        result.append(dict(event, start=event["time"], end=end.get("time"), rc=end.get("rc")))
    return result


if __name__ == "__main__":
    raise SystemExit(main())
