#!/usr/bin/env python3
"""Bring a host's Docker Compose app to the tip of its pushed branch: one run, one deploy.

A run, in order:
 1. takes an exclusive lock (a second run waits for the first);
 2. fetches <remote>/<branch>; when its tip is the commit this tool last
    deployed, prints "up to date" and stops without any docker command;
 3. checks that a fast-forward destroys nothing on the host, else refuses
    and changes nothing: another branch checked out, local commits, a
    force-pushed remote, tracked files edited on the host that the update
    changes, untracked or ignored files (a .env) where the update adds files;
 4. decides on rebuilding from every file changed since the last deploy,
    and since the commit checked out;
 5. fast-forwards the checkout (and updates its submodules), then builds,
    while the old containers serve;
 6. recreates the containers (`up --wait` where the compose command has it);
    on failure puts the previous commit back, rebuilds if it had built, and
    brings that up again;
 7. records the deploy; 8. prunes dangling images (a failure only warns).

Inputs: the options of `build_parser`, each also read from an environment
variable (the flag wins); DEPLOY_SHA, DEPLOY_REF and DEPLOY_DELIVERY, set by
the watcher, are only recorded.

Outputs: timestamped progress lines on stdout, child output streamed as it
comes; on failure one `error: ...` line on stderr, and the exit status:
  0 deployed, or already up to date
  1 the deploy failed: rolled back, or nothing had been changed yet
  2 bad usage or configuration; nothing changed
  3 refused to protect work on the host; nothing changed
  4 another deploy held the lock past --lock-timeout
  5 the rollback failed too: the site may be down, a person must look

Side effects: updates refs/remotes/<remote>/<branch>; moves the checked-out
branch (never `reset --hard`, never `clean`: untracked and ignored files are
never touched) and checks out its submodules; runs compose build/up and
`docker image prune -f`; keeps its record in <git-dir>/webhook-deploy/ and its
lock in <git-dir>/webhook-deploy.lock, both out of git's sight.
"""

import argparse
import collections
import contextlib
import ctypes
import fcntl
import fnmatch
import json
import logging
import os
import posixpath
import re
import select
import shlex
import signal
import subprocess
import sys
import tempfile
import time

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_REFUSED = 3
EXIT_LOCKED = 4
EXIT_ROLLBACK_FAILED = 5

BUILD_MODES = ("auto", "always", "never")
COMPOSE_FILES = ("compose.yaml", "compose.yml", "docker-compose.yml", "docker-compose.yaml")
COMPOSE_PATTERNS = ("docker-compose*.yml", "docker-compose*.yaml", "compose*.yml", "compose*.yaml")
DEFAULT_SSH_COMMAND = "ssh -o BatchMode=yes"
SUBMODULE_UPDATE = ("submodule", "update", "--init", "--recursive")
TRIGGER_VARIABLES = (("DEPLOY_SHA", "sha"), ("DEPLOY_REF", "ref"), ("DEPLOY_DELIVERY", "delivery"))

# Seconds a run waits for the run before it: longer than the longest run the
# timeouts below allow (a build, a failed up, a rollback build and up: about
# 2.6 h), so a queued run never gives up on a live one and loses its push.
DEFAULT_LOCK_TIMEOUT = 4 * 3600.0
DEFAULT_WAIT_TIMEOUT = 300  # seconds `up --wait` gives containers to be running and healthy
LOCK_POLL_INTERVAL = 0.2  # seconds between two tries at the lock
GIT_TIMEOUT = 60.0  # seconds for a local git command
FETCH_TIMEOUT = 300.0  # seconds for `git fetch`
PROBE_TIMEOUT = 30.0  # seconds for `compose version` and `compose up --help`
BUILD_TIMEOUT = 3600.0  # seconds for `compose build`
UP_TIMEOUT_MARGIN = 300.0  # seconds `up` may take beyond --wait-timeout (pulls, recreating)
PRUNE_TIMEOUT = 600.0  # seconds for `docker image prune`
TERM_GRACE = 5.0  # seconds a timed-out child gets between SIGTERM and SIGKILL
# Seconds of silence after a streamed child exited before its output counts as
# over, though something it started (ssh's ControlMaster) keeps the pipe open.
QUIET_AFTER_EXIT = 0.5
OUTPUT_TAIL_LINES = 20  # lines of a streamed child's output kept for its error message
COMMITS_SHOWN = 10  # commits listed in the plan
NAMES_SHOWN = 10  # file names listed in one message
HISTORY_SHOWN = 10  # runs listed by --status

STATE_DIR = "webhook-deploy"  # inside the git dir
LOCK_NAME = "webhook-deploy.lock"  # inside the git dir
RECORD_NAME = "last-deployed.json"
HISTORY_NAME = "history.jsonl"
# Marks of a step cut short. "build": the images may not match the last
# deployed commit (a build failed or was killed half-way), so the next deploy
# rebuilds. "up": the containers may be half recreated, so the next run
# deploys again even when the tip is the commit recorded.
BUILD_MARK = "build-unfinished"
UP_MARK = "up-unfinished"

RESULTS = {
    EXIT_OK: "deployed",
    EXIT_FAILED: "failed",
    EXIT_USAGE: "bad configuration",
    EXIT_REFUSED: "refused",
    EXIT_LOCKED: "lock timeout",
    EXIT_ROLLBACK_FAILED: "rollback failed",
}

PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>

NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._/-]*")
COMMIT_RE = re.compile(r"[0-9a-f]{40}([0-9a-f]{24})?")
# COPY or ADD of the build context itself, options allowed: `COPY --chown=app . /app`.
COPY_CONTEXT_RE = re.compile(r"^\s*(?:COPY|ADD)(?:\s+--\S+)*\s+\./?\s", re.IGNORECASE | re.MULTILINE)
WAIT_OPTION_RE = re.compile(r"--wait(?![\w-])")
# A line of a .env that gives COMPOSE_FILE a value (not "" nor '').
COMPOSE_FILE_LINE_RE = re.compile(r"""\s*(export\s+)?COMPOSE_FILE\s*=\s*(?!""|'')[^\s#]""")
INDEX_LOCK_RE = re.compile(r"Unable to create '([^']*index\.lock)': File exists")

log = logging.getLogger(__name__)


class DeployError(Exception):
    """An expected failure: one line for the person reading the log, and an exit status.

    `output` holds what the failed child printed, and `timed_out` whether
    it was stopped for running too long, for callers that tell failures
    apart by them.
    """

    def __init__(self, message, code=EXIT_FAILED, output="", timed_out=False):
        super().__init__(message)
        self.code = code
        self.output = output
        self.timed_out = timed_out


def _load_prctl():
    """libc's prctl, or None where there is none (not Linux): then children just lack the guard."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


_PRCTL = _load_prctl()


def _die_with(parent_pid, signum):
    """Runs in the forked child: have the kernel send it `signum` when deploy.py dies.

    Without this, a deploy.py killed outright (SIGKILL, the OOM killer)
    leaves its `compose build` running, racing the next deploy.
    """
    if _PRCTL is None:
        return
    _PRCTL(PR_SET_PDEATHSIG, signum)
    # The parent may have died between fork and prctl: nobody would signal us.
    if os.getppid() != parent_pid:
        os._exit(EXIT_FAILED)


def _summary(text, last=False):
    """One line out of a child's output: its first (or last) two meaningful lines."""
    lines = [line.strip() for line in text.splitlines()]
    lines = [line for line in lines if line and not line.startswith("hint:")]
    picked = lines[-1:] if last else lines[:2]
    line = "; ".join(picked) or "no output"
    return line if len(line) <= 300 else line[:297] + "..."


def _decode(data):
    return data.decode("utf-8", "surrogateescape")


def run(argv, cwd, timeout, env=None, stream=False, check=True, death_signal=signal.SIGKILL):
    """Run `argv` in `cwd`, stopping it after `timeout` seconds; return a CompletedProcess.

    stream=False captures stdout and stderr. stream=True logs the child's
    stdout and stderr line by line as they come, and keeps the last lines in
    .stdout for the error message. The child gets `death_signal` should
    deploy.py die; one that runs too long gets SIGTERM, then SIGKILL after
    TERM_GRACE. Raises DeployError (with the child's output) when the
    command cannot start, times out, or exits non-zero while `check` is true.
    """
    shown = shlex.join(argv)
    with contextlib.ExitStack() as files:
        if stream:
            stdout, stderr = subprocess.PIPE, subprocess.STDOUT
        else:
            # Files, not pipes: a grandchild that keeps a pipe open (ssh's
            # ControlMaster holds git's stderr) would make reading it last
            # until the timeout, though the child itself is long gone.
            try:
                stdout = files.enter_context(tempfile.TemporaryFile())
                stderr = files.enter_context(tempfile.TemporaryFile())
            except OSError as err:
                raise DeployError(f"cannot run `{shown}`: no temporary file: {err}") from None
        try:
            child = subprocess.Popen(
                argv,
                cwd=cwd,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=stdout,
                stderr=stderr,
                close_fds=True,
                preexec_fn=lambda parent=os.getpid(): _die_with(parent, death_signal),
            )
        except OSError as err:
            if check:
                raise DeployError(f"cannot run `{shown}`: {err.strerror}") from None
            return subprocess.CompletedProcess(argv, 127, "", str(err))
        with child:
            try:
                if stream:
                    out_text, err_text = _stream(child, timeout), ""
                else:
                    _wait(child, timeout)
                    out_text, err_text = _read(stdout), _read(stderr)
            except subprocess.TimeoutExpired as expired:
                _stop(child)
                output = (expired.output or "") if stream else _read(stderr) or _read(stdout)
                raise DeployError(
                    f"`{shown}` timed out after {timeout:g} s", output=output, timed_out=True
                ) from None
    if check and child.returncode != 0:
        output = out_text if stream else err_text or out_text
        raise DeployError(
            f"`{shown}` failed (exit {child.returncode}): {_summary(output, last=stream)}",
            output=output,
        )
    return subprocess.CompletedProcess(argv, child.returncode, out_text, err_text)


def _wait(child, timeout):
    """child.wait(timeout), without its polling, which oversleeps the exit by up to 50 ms."""
    try:
        pidfd = os.pidfd_open(child.pid)
    except (AttributeError, OSError):  # not Linux 5.3 or later
        child.wait(timeout=timeout)
        return
    try:
        poller = select.poll()
        poller.register(pidfd, select.POLLIN)
        if not poller.poll(timeout * 1000):
            raise subprocess.TimeoutExpired(child.args, timeout)
    finally:
        os.close(pidfd)
    child.wait()


def _read(file):
    file.seek(0)
    return _decode(file.read())


def _stop(child):
    """SIGTERM first, so git removes its lock files (index.lock); SIGKILL if that is not enough."""
    child.terminate()
    try:
        child.wait(timeout=TERM_GRACE)
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait()


def _stream(child, timeout):
    """Log a child's output line by line until it ends; return its last lines."""
    deadline = time.monotonic() + timeout
    tail = collections.deque(maxlen=OUTPUT_TAIL_LINES)
    poller = select.poll()
    poller.register(child.stdout, select.POLLIN)
    fd = child.stdout.fileno()
    pending = b""
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise subprocess.TimeoutExpired(child.args, timeout, "\n".join(tail))
        if not poller.poll(min(remaining, QUIET_AFTER_EXIT) * 1000):
            # Quiet, and the child is gone: whoever still holds the pipe
            # open is not going to say more that matters.
            if child.poll() is not None:
                break
            continue
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        *lines, pending = (pending + chunk).split(b"\n")
        for line in lines:
            _emit(line, tail)
    if pending:
        _emit(pending, tail)
    # Output closed; the child may still be finishing.
    child.wait(timeout=max(deadline - time.monotonic(), 0.001))
    return "\n".join(tail)


def _emit(line, tail):
    text = _decode(line).rstrip("\r")
    if text.strip():
        tail.append(text)
        log.info("  | %s", text)


def _utc_now():
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _short(commit):
    return commit[:12] if commit else "none"


def _names(paths):
    shown = ", ".join(paths[:NAMES_SHOWN])
    more = len(paths) - NAMES_SHOWN
    return f"{shown} and {more} more" if more > 0 else shown


def image_input_kind(path, compose_file=None):
    """What makes `path` (relative to the repository root) an input of the images, or None.

    Names are matched at any depth and without regard to case: rebuilding
    once too often costs a build, once too few deploys stale images.
    """
    name = posixpath.basename(path).lower()
    if compose_file and path == compose_file:
        return "compose file"
    # Also Dockerfile-specific ignore files (web.Dockerfile.dockerignore).
    if name == ".dockerignore" or name.endswith(".dockerignore"):
        return ".dockerignore"
    if name == "dockerfile" or name.startswith("dockerfile.") or name.endswith(".dockerfile"):
        return "Dockerfile"
    if any(fnmatch.fnmatchcase(name, pattern) for pattern in COMPOSE_PATTERNS):
        return "compose file"
    if fnmatch.fnmatchcase(name, "requirements*.txt"):
        return "requirements"
    return None


def rebuild_decision(mode, first_deploy, build_unfinished, inputs):
    """(rebuild?, the plan's line saying why) for build mode `mode`.

    `inputs` are the changed image inputs, as (path, kind) pairs.
    """
    if mode == "never":
        return False, "no rebuild: --build never"
    if mode == "always":
        return True, "rebuild: --build always"
    if first_deploy:
        return True, "rebuild: first deploy"
    if build_unfinished:
        return True, "rebuild: an earlier build did not finish (the images may be half new)"
    if not inputs:
        return False, "no rebuild: no image inputs changed (--build auto)"
    kinds = list(dict.fromkeys(kind for _, kind in inputs))
    what = " and ".join([", ".join(kinds[:-1]), kinds[-1]] if len(kinds) > 1 else kinds)
    return True, f"rebuild: {what} changed ({_names([path for path, _ in inputs])})"


class Checkout:
    """The host's git checkout; runs git in it, never letting git prompt."""

    def __init__(self, app_dir, environ):
        self.dir = app_dir
        # LC_ALL=C: git's messages are parsed below. GIT_OPTIONAL_LOCKS=0:
        # `git status` must not take index.lock behind the owner's back.
        self.env = dict(environ, GIT_TERMINAL_PROMPT="0", GIT_OPTIONAL_LOCKS="0", LC_ALL="C")
        self.git_dir = self.top = None

    def git(self, *args, timeout=GIT_TIMEOUT, check=True):
        try:
            # SIGTERM, not SIGKILL, should deploy.py die: git then removes
            # its index.lock, which would otherwise fail every later deploy.
            return run(
                ["git", *args],
                cwd=self.dir,
                env=self.env,
                timeout=timeout,
                check=check,
                death_signal=signal.SIGTERM,
            )
        except DeployError as err:
            stale = INDEX_LOCK_RE.search(err.output)
            if stale:
                raise DeployError(
                    f"git cannot lock the index: {stale.group(1)} exists (left by a git that was"
                    f" killed?); if no git process is running, remove {stale.group(1)}, then"
                    " deploy again",
                    err.code,
                    err.output,
                ) from None
            if "detected dubious ownership" in err.output:
                hint = re.search(r"git config --global --add safe\.directory \S+", err.output)
                fix = (
                    hint.group(0)
                    if hint
                    else f"git config --global --add safe.directory {self.dir}"
                )
                raise DeployError(
                    f"git refuses {self.dir}: detected dubious ownership (it belongs to another"
                    f" user); run the deploy as the checkout's owner, or trust it once: {fix}",
                    EXIT_USAGE,
                ) from None
            raise

    def open(self):
        """Find the git dir and top level; a one-line error when this is no checkout."""
        if not os.path.isdir(self.dir):
            raise DeployError(f"app dir {self.dir} does not exist or is not a folder", EXIT_USAGE)
        try:
            out = self.git(
                "rev-parse", "--absolute-git-dir", "--is-inside-work-tree", "--show-toplevel"
            )
        except DeployError as err:
            if err.code == EXIT_USAGE:
                raise
            raise DeployError(
                f"app dir {self.dir} is not a git checkout ({_summary(err.output)})", EXIT_USAGE
            ) from None
        lines = out.stdout.splitlines()
        if len(lines) != 3 or lines[1] != "true":
            raise DeployError(
                f"app dir {self.dir} is not a git checkout with a work tree", EXIT_USAGE
            )
        self.git_dir, self.top = lines[0], lines[2]

    def use_remote(self, remote):
        """Check that `remote` exists; make ssh fail, not prompt, unless the user set ssh up."""
        config = {}
        for item in self.git("config", "-z", "--list").stdout.split("\0"):
            key, _, value = item.partition("\n")
            config[key] = value
        if f"remote.{remote}.url" not in config:
            raise DeployError(
                f"remote '{remote}' is not configured in {self.dir}"
                f" (see `git -C {shlex.quote(self.dir)} remote -v`)",
                EXIT_USAGE,
            )
        # git lists section and key names in lower case.
        if not ({"GIT_SSH_COMMAND", "GIT_SSH"} & set(self.env) or "core.sshcommand" in config):
            self.env["GIT_SSH_COMMAND"] = DEFAULT_SSH_COMMAND

    def rev(self, name):
        return self.git("rev-parse", "--verify", "--quiet", f"{name}^{{commit}}").stdout.strip()

    def fetch(self, remote, branch):
        """Fetch the branch into its remote-tracking ref; return the tip's commit id."""
        tracking = f"refs/remotes/{remote}/{branch}"
        try:
            self.git(
                "fetch",
                "--no-tags",
                remote,
                f"+refs/heads/{branch}:{tracking}",
                timeout=FETCH_TIMEOUT,
            )
        except DeployError as err:
            if err.code == EXIT_USAGE:
                raise
            if "couldn't find remote ref" in err.output:
                raise DeployError(
                    f"branch '{branch}' does not exist on remote '{remote}'", EXIT_USAGE
                ) from None
            # A timeout leaves little output, if any: say it timed out.
            if err.timed_out:
                raise DeployError(
                    f"git fetch {remote} failed: timed out after {FETCH_TIMEOUT:g} s"
                ) from None
            raise DeployError(f"git fetch {remote} failed: {_summary(err.output)}") from None
        return self.rev(tracking)

    def has_commit(self, commit):
        """Whether `commit` is in the repository (a force-push and a gc can remove one)."""
        return self.git("cat-file", "-e", f"{commit}^{{commit}}", check=False).returncode == 0

    def has_submodules(self, commit):
        return self.git("cat-file", "-e", f"{commit}:.gitmodules", check=False).returncode == 0

    def update_submodules(self):
        """Check out the submodule commits HEAD records: merge and reset leave them as they were."""
        self.git(*SUBMODULE_UPDATE, timeout=FETCH_TIMEOUT)

    def is_ancestor(self, older, newer):
        result = self.git("merge-base", "--is-ancestor", older, newer, check=False)
        if result.returncode not in (0, 1):
            raise DeployError(f"git merge-base failed: {_summary(result.stderr)}")
        return result.returncode == 0

    def changes(self, old, new):
        """{path: status letter} of the files that differ between two commits."""
        fields = self.git(
            "diff", "--name-status", "--no-renames", "-z", old, new, "--"
        ).stdout.split("\0")
        return dict(zip(fields[1::2], fields[0::2]))

    def edited(self):
        """Tracked files that differ from HEAD on the host, staged or not.

        Submodules are left out: one checked out at another commit than
        HEAD records is stale, not edited, and `submodule update` moves it.
        """
        entries = self.git(
            "status",
            "--porcelain",
            "--no-renames",
            "-z",
            "--untracked-files=no",
            "--ignore-submodules=all",
        ).stdout
        return {entry[3:] for entry in entries.split("\0") if entry}

    def dockerfiles_copying_context(self, commit):
        """The Dockerfiles at `commit` that COPY or ADD their whole build context (`COPY . .`)."""
        names = self.git("ls-tree", "-r", "-z", "--name-only", commit).stdout.split("\0")
        found = []
        for path in names:
            if image_input_kind(path) != "Dockerfile":
                continue
            text = self.git("show", f"{commit}:{path}", check=False).stdout
            if COPY_CONTEXT_RE.search(text):
                found.append(path)
        return found

    def commits(self, old, new):
        """Up to COMMITS_SHOWN + 1 lines "<short id> <subject>", newest first."""
        out = self.git(
            "log", f"-n{COMMITS_SHOWN + 1}", "--format=%h %s", f"{old}..{new}", "--"
        ).stdout
        return out.splitlines()


class State:
    """This tool's record, in the checkout's git dir: survives reboots, unseen by git."""

    def __init__(self, git_dir):
        self.dir = os.path.join(git_dir, STATE_DIR)
        self.record_path = os.path.join(self.dir, RECORD_NAME)
        self.history_path = os.path.join(self.dir, HISTORY_NAME)

    def last_deployed(self):
        """The last successful deploy's record, or None before the first."""
        try:
            with open(self.record_path, encoding="utf-8") as file:
                record = json.load(file)
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as err:
            raise DeployError(
                f"cannot read {self.record_path} ({err});"
                " move it away to deploy as if for the first time",
                EXIT_USAGE,
            ) from None
        if not isinstance(record, dict) or not COMMIT_RE.fullmatch(str(record.get("commit"))):
            raise DeployError(
                f"{self.record_path} holds no commit id;"
                " move it away to deploy as if for the first time",
                EXIT_USAGE,
            )
        return record

    def history(self, count):
        """The last `count` runs recorded, oldest first."""
        try:
            with open(self.history_path, encoding="utf-8", errors="replace") as file:
                lines = collections.deque(file, maxlen=count)
        except FileNotFoundError:
            return []
        except OSError as err:
            raise DeployError(f"cannot read {self.history_path}: {err.strerror}") from None
        entries = []
        for line in lines:
            with contextlib.suppress(ValueError):
                entries.append(json.loads(line))
        return [entry for entry in entries if isinstance(entry, dict)]

    def marked(self, mark):
        return os.path.exists(os.path.join(self.dir, mark))

    def write_record(self, record):
        self._write(self.record_path, json.dumps(record, indent=2) + "\n")

    def mark(self, mark, commit):
        self._write(os.path.join(self.dir, mark), commit + "\n")

    def clear(self, mark):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(self.dir, mark))

    def append_history(self, entry):
        line = (json.dumps(entry, separators=(",", ":")) + "\n").encode("utf-8", "surrogateescape")
        try:
            os.makedirs(self.dir, exist_ok=True)
            fd = os.open(self.history_path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                # A run killed mid-write leaves a torn last line: end it, or
                # this entry would be lost with it.
                size = os.fstat(fd).st_size
                if size and os.pread(fd, 1, size - 1) != b"\n":
                    line = b"\n" + line
                # One write per line: concurrent appends never interleave.
                os.write(fd, line)
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as err:
            raise DeployError(f"cannot write {self.history_path}: {err.strerror}") from None

    def _write(self, path, text):
        """Replace `path` atomically: readers see the old file or the new one, never half of one."""
        temp = os.path.join(self.dir, f".{os.path.basename(path)}.{os.getpid()}")
        try:
            os.makedirs(self.dir, exist_ok=True)
            with open(temp, "w", encoding="utf-8", errors="surrogateescape") as file:
                file.write(text)
                file.flush()
                os.fsync(file.fileno())
            os.replace(temp, path)
        except OSError as err:
            with contextlib.suppress(OSError):
                os.unlink(temp)
            raise DeployError(f"cannot write {path}: {err.strerror}") from None


def take_lock(path, timeout):
    """Hold an exclusive flock on `path` until this process ends; return its descriptor.

    The kernel drops the lock when the process dies, however it dies, so a
    lock is never stale. os.open makes the descriptor close-on-exec: no
    child inherits the lock.
    """
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:
        raise DeployError(f"cannot open lock file {path}: {err.strerror}", EXIT_USAGE) from None
    deadline = time.monotonic() + timeout
    waiting = False
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "holder unknown"
            if time.monotonic() >= deadline:
                os.close(fd)
                raise DeployError(
                    f"another deploy is running ({holder}) and kept the lock {path}"
                    f" past --lock-timeout {timeout:g} s; nothing changed",
                    EXIT_LOCKED,
                ) from None
            if not waiting:
                log.info("another deploy is running (%s): waiting for it", holder)
                waiting = True
            time.sleep(LOCK_POLL_INTERVAL)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} since {_utc_now()}\n".encode(), 0)
    return fd


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise DeployError(message, EXIT_USAGE)


def build_parser():
    parser = _Parser(
        prog="deploy.py",
        description="Deploy the pushed branch of a git checkout with Docker Compose: fetch,"
        " fast-forward, build, recreate, roll back on failure, prune. Each option can also be"
        " set by the environment variable named in its help; the option wins.",
        epilog="exit status: 0 deployed or up to date; 1 failed (rolled back, or nothing changed);"
        " 2 bad usage or configuration; 3 refused to protect work on the host; 4 another deploy"
        " held the lock too long; 5 the rollback failed too: the site may be down.",
    )
    add = parser.add_argument
    add(
        "--app-dir",
        metavar="DIR",
        help="the git checkout holding the compose file (DEPLOY_APP_DIR; required)",
    )
    add("--remote", metavar="NAME", help="the git remote to fetch (DEPLOY_REMOTE; default: origin)")
    add("--branch", metavar="NAME", help="the branch to deploy (DEPLOY_BRANCH; default: main)")
    add(
        "--compose",
        metavar="COMMAND",
        help="the compose command, split like a shell would; a wrapper script must `exec` its"
        " command, or a killed deploy leaves that running (DEPLOY_COMPOSE; default:"
        " `docker compose` if it answers, else `docker-compose`)",
    )
    add(
        "--compose-file",
        metavar="FILE",
        help="compose file passed as -f, relative to the app dir (DEPLOY_COMPOSE_FILE;"
        f" default: compose's own lookup, which needs one of {', '.join(COMPOSE_FILES)},"
        " or COMPOSE_FILE in the environment or the app dir's .env)",
    )
    add(
        "--build",
        metavar="WHEN",
        help="when to rebuild images: auto (when a Dockerfile, compose file, requirements*.txt"
        " or .dockerignore changed, and on the first deploy), always (images that COPY the"
        " code) or never (DEPLOY_BUILD; default: auto)",
    )
    add(
        "--pull",
        action=argparse.BooleanOptionalAction,
        help="build with --pull to refresh base images; --no-pull for base images that exist only"
        " on this host (DEPLOY_PULL=1|0; default: pull)",
    )
    add(
        "--lock-file",
        metavar="PATH",
        help="the lock that makes deploys wait for each other"
        f" (DEPLOY_LOCK_FILE; default: {LOCK_NAME} in the checkout's git dir)",
    )
    add(
        "--lock-timeout",
        metavar="SECONDS",
        help="how long to wait for another deploy"
        f" (DEPLOY_LOCK_TIMEOUT; default: {DEFAULT_LOCK_TIMEOUT:g})",
    )
    add(
        "--wait-timeout",
        metavar="SECONDS",
        help="how long `up --wait` gives the containers to be running and healthy"
        f" (DEPLOY_WAIT_TIMEOUT; default: {DEFAULT_WAIT_TIMEOUT:g})",
    )
    add(
        "--dry-run",
        action="store_true",
        default=None,
        help="print the plan and change nothing: no working tree change, no docker command"
        " (DEPLOY_DRY_RUN=1)",
    )
    add(
        "--force",
        action="store_true",
        help="deploy even when the tip is already deployed (recreates the containers)",
    )
    add(
        "--status",
        action="store_true",
        help="print the last deploy and the recent runs, and change nothing",
    )
    add(
        "--check",
        action="store_true",
        help="check the settings and the app dir (no git, no docker, no network), then exit;"
        " the watcher's --check runs this",
    )
    return parser


def resolve_options(args, environ):
    """Fill in what no flag gave from the environment, then defaults; check every value.

    All checks across options live here. Returns the settings as a Namespace.
    """

    def pick(attr, variable, default):
        """(value, where it came from): the flag, else its variable, else the default.

        A blank variable (`DEPLOY_LOCK_FILE=" "` in a conf.d file) counts as
        unset; a blank flag is refused, rather than making a file named " ".
        """
        flag = "--" + attr.replace("_", "-")
        value = getattr(args, attr)
        if isinstance(value, str) and not value.strip():
            raise DeployError(f"{flag}: {value!r} is blank", EXIT_USAGE)
        if value is not None:
            return value, flag
        value = environ.get(variable, "")
        if value.strip():
            return value, variable
        return default, flag

    def seconds(attr, variable, default, kind, least):
        """A number of seconds of type `kind` (float, or int where compose wants one), >= least."""
        value, source = pick(attr, variable, default)
        try:
            number = kind(value)
        except ValueError:
            number = None
        if number is None or not least <= number < float("inf"):
            whole = "a whole " if kind is int else "a "
            raise DeployError(
                f"{source}: {value!r} is not {whole}number of seconds ({least} or more)", EXIT_USAGE
            )
        return number

    def switch(attr, variable, default):
        value, source = pick(attr, variable, default)
        if isinstance(value, bool):
            return value
        lowered = value.lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise DeployError(f"{source}: {value!r} is not 1 or 0", EXIT_USAGE)

    app_dir, _ = pick("app_dir", "DEPLOY_APP_DIR", None)
    if not app_dir:
        raise DeployError(
            "the app dir is required: pass --app-dir DIR or set DEPLOY_APP_DIR", EXIT_USAGE
        )
    names = {}
    for attr, variable, default in (
        ("remote", "DEPLOY_REMOTE", "origin"),
        ("branch", "DEPLOY_BRANCH", "main"),
    ):
        value, source = pick(attr, variable, default)
        bad = ("..", "//", "@{")
        if (
            not NAME_RE.fullmatch(value)
            or any(b in value for b in bad)
            or value.endswith(("/", ".", ".lock"))
        ):
            raise DeployError(f"{source}: {value!r} is not a valid {attr} name", EXIT_USAGE)
        names[attr] = value
    compose, source = pick("compose", "DEPLOY_COMPOSE", None)
    if compose is not None:
        try:
            compose = shlex.split(compose)
        except ValueError as err:
            raise DeployError(f"{source}: cannot split {compose!r}: {err}", EXIT_USAGE) from None
        if not compose:
            raise DeployError(f"{source}: empty compose command", EXIT_USAGE)
    build, source = pick("build", "DEPLOY_BUILD", "auto")
    if build not in BUILD_MODES:
        raise DeployError(
            f"{source}: unknown build mode {build!r} (choose auto, always or never)", EXIT_USAGE
        )
    if args.status and (args.force or args.dry_run):
        raise DeployError(
            "--status only prints: it cannot be combined with --force or --dry-run", EXIT_USAGE
        )
    lock_file, _ = pick("lock_file", "DEPLOY_LOCK_FILE", None)
    compose_file, _ = pick("compose_file", "DEPLOY_COMPOSE_FILE", None)
    return argparse.Namespace(
        app_dir=os.path.abspath(app_dir),
        remote=names["remote"],
        branch=names["branch"],
        compose=compose,
        compose_file=compose_file,
        build=build,
        pull=switch("pull", "DEPLOY_PULL", True),
        lock_file=os.path.abspath(lock_file) if lock_file else None,
        lock_timeout=seconds("lock_timeout", "DEPLOY_LOCK_TIMEOUT", DEFAULT_LOCK_TIMEOUT, float, 0),
        wait_timeout=seconds("wait_timeout", "DEPLOY_WAIT_TIMEOUT", DEFAULT_WAIT_TIMEOUT, int, 1),
        dry_run=switch("dry_run", "DEPLOY_DRY_RUN", False),
        force=args.force,
        status=args.status,
        check=args.check,
    )


def check_compose_file(opts, environ):
    """Fail early, as bad configuration, when compose would find no file to read."""
    if opts.compose_file:
        if not os.path.isfile(os.path.join(opts.app_dir, opts.compose_file)):
            raise DeployError(
                f"compose file {opts.compose_file} not found in {opts.app_dir}", EXIT_USAGE
            )
        return
    # COMPOSE_FILE names the files instead; compose reads it from its
    # environment, else from the .env of the folder it runs in.
    if environ.get("COMPOSE_FILE", "").strip() or _dot_env_names_compose_file(opts.app_dir):
        return
    if not any(os.path.isfile(os.path.join(opts.app_dir, name)) for name in COMPOSE_FILES):
        raise DeployError(
            f"no compose file in {opts.app_dir} (looked for {', '.join(COMPOSE_FILES)});"
            " name yours with --compose-file",
            EXIT_USAGE,
        )


def _dot_env_names_compose_file(app_dir):
    try:
        with open(os.path.join(app_dir, ".env"), encoding="utf-8", errors="replace") as file:
            return any(COMPOSE_FILE_LINE_RE.match(line) for line in file)
    except OSError:
        return False


def detect_compose(opts):
    """The compose command that answers `version`, as an argv prefix."""
    candidates = [opts.compose] if opts.compose else [["docker", "compose"], ["docker-compose"]]
    for candidate in candidates:
        result = run([*candidate, "version"], cwd=opts.app_dir, timeout=PROBE_TIMEOUT, check=False)
        if result.returncode == 0:
            version = _summary(result.stdout or result.stderr)
            log.info("compose: using `%s` (%s)", shlex.join(candidate), version)
            return candidate
    if opts.compose:
        raise DeployError(
            f"no compose command found: `{shlex.join(opts.compose)} version` failed:"
            f" {_summary(result.stderr or result.stdout)}",
            EXIT_USAGE,
        )
    raise DeployError(
        "no compose command found: neither `docker compose` nor `docker-compose` answers `version`;"
        " install Docker Compose, or name yours with --compose/DEPLOY_COMPOSE",
        EXIT_USAGE,
    )


def compose_project(compose, opts):
    """The compose project's name, from Compose v2's `config`; None where it cannot tell (v1)."""
    base = [*compose, "-f", opts.compose_file] if opts.compose_file else compose
    result = run(
        [*base, "config", "--format", "json"], cwd=opts.app_dir, timeout=PROBE_TIMEOUT, check=False
    )
    try:
        name = json.loads(result.stdout).get("name") if result.returncode == 0 else None
    except (ValueError, AttributeError):
        return None
    return name if isinstance(name, str) and name else None


def prune_command(project):
    """`docker image prune`, kept to this app's images where its project is known.

    Compose v2 labels the images it builds with their project: other apps'
    dangling images on the same engine are left alone. v1 labels nothing, so
    there it prunes every dangling image, as the original procedure did.
    """
    argv = ["docker", "image", "prune", "-f"]
    if project:
        argv += ["--filter", f"label=com.docker.compose.project={project}"]
    return argv


def supports_wait(compose, cwd):
    """Whether `compose up` has --wait (Compose v2.1.1 and later; v1 never)."""
    result = run([*compose, "up", "--help"], cwd=cwd, timeout=PROBE_TIMEOUT, check=False)
    return result.returncode == 0 and bool(WAIT_OPTION_RE.search(result.stdout))


class Deployment:
    """One run, from the fetch to the record; holds what the record and history need."""

    def __init__(self, opts, checkout, state, environ):
        self.opts = opts
        self.checkout = checkout
        self.state = state
        self.trigger = {key: environ[name] for name, key in TRIGGER_VARIABLES if environ.get(name)}
        self.started = time.monotonic()
        self.steps = []
        self.tip = self.previous = None
        self.built = False

    @contextlib.contextmanager
    def step(self, name):
        """Time one step, log its end with its duration, keep it for the record."""
        started = time.monotonic()
        try:
            yield
        except BaseException:
            seconds = time.monotonic() - started
            self.steps.append({"step": name, "seconds": round(seconds, 3), "ok": False})
            log.info("%s failed after %.2f s", name, seconds)
            raise
        seconds = time.monotonic() - started
        self.steps.append({"step": name, "seconds": round(seconds, 3)})
        log.info("%s done in %.2f s", name, seconds)

    def run_step(self, name, argv, timeout):
        """Run one docker command as a timed step, its output streamed to the log."""
        with self.step(name):
            log.info("run: %s", shlex.join(argv))
            run(argv, cwd=self.opts.app_dir, timeout=timeout, stream=True)

    def run(self):
        opts = self.opts
        log.info(
            "deploy of %s/%s in %s (pid %d)%s",
            opts.remote,
            opts.branch,
            opts.app_dir,
            os.getpid(),
            ": dry run" if opts.dry_run else "",
        )
        if self.trigger:
            log.info(
                "trigger: %s", ", ".join(f"{key} {value}" for key, value in self.trigger.items())
            )
        with self.step("lock"):
            lock = take_lock(
                opts.lock_file or os.path.join(self.checkout.git_dir, LOCK_NAME), opts.lock_timeout
            )
        try:
            return self.locked_run()
        finally:
            os.close(lock)

    def locked_run(self):
        opts, checkout = self.opts, self.checkout
        with self.step("fetch"):
            self.tip = checkout.fetch(opts.remote, opts.branch)
        record = self.state.last_deployed()
        last = record["commit"] if record else None
        if last == self.tip and not opts.force:
            if not self.state.marked(UP_MARK):
                log.info("up to date at %s", self.tip)
                return EXIT_OK
            log.warning(
                "warning: the last deploy was cut short while recreating the containers:"
                " deploying %s again",
                _short(self.tip),
            )
        if last and not checkout.has_commit(last):
            # git diff against it would fail this deploy and every later one.
            log.warning(
                "warning: the last deployed commit %s is gone from the repository (history"
                " rewritten?): deploying as if for the first time",
                last,
            )
            record = last = None
        with self.step("check"):
            plan = self.check(last)
        compose = wait = project = None
        if not opts.dry_run:
            with self.step("compose"):
                compose = detect_compose(opts)
                wait = supports_wait(compose, opts.app_dir)
                project = compose_project(compose, opts)
        commands = self.commands(compose, wait, project)
        self.show_plan(plan, record, commands)
        if opts.dry_run:
            log.info("dry run: nothing changed")
            return EXIT_OK
        return self.apply(plan, commands)

    def check(self, last):
        """Refuse (EXIT_REFUSED) what a fast-forward to the tip could destroy; return the plan."""
        opts, checkout, tip = self.opts, self.checkout, self.tip
        where = checkout.dir
        # Pasted into a shell as it is: a folder with spaces must stay one word.
        quoted = shlex.quote(where)
        tracking = f"{opts.remote}/{opts.branch}"
        head_ref = checkout.git("symbolic-ref", "--quiet", "HEAD", check=False).stdout.strip()
        if head_ref != f"refs/heads/{opts.branch}":
            found = (
                f"branch '{head_ref[len('refs/heads/'):]}' is checked out"
                if head_ref.startswith("refs/heads/")
                else "HEAD is detached"
            )
            raise DeployError(
                f"refused: {found} in {where}, but deploys follow '{opts.branch}';"
                f" run `git -C {quoted} switch {opts.branch}`, then deploy again; nothing changed",
                EXIT_REFUSED,
            )
        head = checkout.rev("HEAD")
        # Without a record, what is checked out is what runs: roll back to it.
        self.previous = last or head
        if head != tip and not checkout.is_ancestor(head, tip):
            exclude = [f"^{tip}"] + ([f"^{last}"] if last else [])
            local = checkout.git("rev-list", head, *exclude, "--").stdout.split()
            if local:
                raise DeployError(
                    f"refused: {len(local)} local commit(s) on {opts.branch} in {where}"
                    f" are not on {tracking} (newest {_short(local[0])}); push them, or keep"
                    f" them on another branch and move {opts.branch} back (`git -C {quoted} branch"
                    f" keep-local && git -C {quoted} reset --keep {tracking}`), then deploy again;"
                    " nothing changed",
                    EXIT_REFUSED,
                )
            raise DeployError(
                f"refused: {tracking} was force-pushed: the checked-out commit {_short(head)}"
                f" is not in its history any more; to deploy {_short(tip)} anyway, run"
                f" `git -C {quoted} reset --keep {tracking}` on the host, then deploy again;"
                " nothing changed",
                EXIT_REFUSED,
            )
        forward = checkout.changes(head, tip) if head != tip else {}
        # What runs is `previous`, what is checked out is `head` (a rollback
        # by hand may have moved it): changes from either may need a rebuild.
        changed = dict(forward)
        if self.previous not in (head, tip):
            changed.update(checkout.changes(self.previous, tip))
        edited = checkout.edited()
        # A rollback goes from the tip back to `previous`: it must not overwrite edits either.
        overwritten = sorted(edited & (set(forward) | set(changed)))
        if overwritten:
            raise DeployError(
                "refused: the update would overwrite tracked files edited on the host:"
                f" {_names(overwritten)}; commit and push them, `git stash` them, or discard"
                f" them (`git -C {quoted} checkout -- {shlex.join(overwritten[:NAMES_SHOWN])}`),"
                " then deploy again; nothing changed",
                EXIT_REFUSED,
            )
        # git overwrites ignored files without a word: a commit adding .env
        # would replace the host's.
        in_the_way = sorted(
            path
            for path, status in forward.items()
            if status == "A" and os.path.lexists(os.path.join(checkout.top, path))
        )
        if in_the_way:
            raise DeployError(
                "refused: the update adds files that exist untracked on the host:"
                f" {_names(in_the_way)}; move them out of the way (they are never"
                " overwritten), then deploy again; nothing changed",
                EXIT_REFUSED,
            )
        kept = sorted(edited)
        if kept:
            log.warning(
                "warning: keeping local edits to tracked files the update does not touch: %s",
                _names(kept),
            )
        compose_file = None
        if opts.compose_file:
            # git gives its top level with symlinks resolved: so must we.
            compose_file = os.path.relpath(
                os.path.realpath(os.path.join(opts.app_dir, opts.compose_file)),
                os.path.realpath(checkout.top),
            )
        inputs = [(path, image_input_kind(path, compose_file)) for path in sorted(changed)]
        inputs = [(path, kind) for path, kind in inputs if kind]
        rebuild, reason = rebuild_decision(
            opts.build, last is None, self.state.marked(BUILD_MARK), inputs
        )
        if not rebuild and opts.build == "auto" and changed:
            copying = checkout.dockerfiles_copying_context(tip)
            if copying:
                log.warning(
                    "warning: no rebuild, but %s copies the whole build context: the code"
                    " changes reach the containers only with a rebuild (set DEPLOY_BUILD=always)",
                    _names(copying),
                )
        return argparse.Namespace(
            head=head,
            changed=sorted(changed),
            inputs=[path for path, _ in inputs],
            rebuild=rebuild,
            reason=reason,
            commits=checkout.commits(self.previous, tip) if self.previous != tip else [],
            submodules=checkout.has_submodules(tip),
            # After a force-push accepted by hand (`reset --keep`), the last
            # deployed commit is off the new history: putting it back makes
            # the next deploy refuse as force-pushed.
            previous_off_history=self.previous not in (head, tip)
            and not checkout.is_ancestor(self.previous, tip),
        )

    def commands(self, compose, wait, project):
        """The docker steps' argv lists; with a placeholder compose when not detected (dry run)."""
        base = compose or self.opts.compose or ["docker", "compose"]
        if self.opts.compose_file:
            base = [*base, "-f", self.opts.compose_file]
        up = [*base, "up", "-d", "--force-recreate", "--remove-orphans"]
        if wait or wait is None:
            up += ["--wait", "--wait-timeout", str(self.opts.wait_timeout)]
        return argparse.Namespace(
            build=[*base, "build"] + (["--pull"] if self.opts.pull else []),
            rollback_build=[*base, "build"],
            up=up,
            up_timeout=self.opts.wait_timeout + UP_TIMEOUT_MARGIN,
            prune=prune_command(project),
            detected=compose is not None,
        )

    def show_plan(self, plan, record, commands):
        opts, tip = self.opts, self.tip
        tracking = f"{opts.remote}/{opts.branch}"
        if record is None:
            log.info(
                "plan: first deploy of %s at %s; the rollback point is HEAD %s",
                tracking,
                _short(tip),
                _short(plan.head),
            )
        elif record["commit"] == tip:
            log.info("plan: redeploy %s at %s, the commit already deployed", tracking, _short(tip))
        else:
            log.info(
                "plan: deploy %s at %s; last deployed %s at %s",
                tracking,
                _short(tip),
                _short(record["commit"]),
                record.get("time", "?"),
            )
        if record is not None and plan.head != record["commit"]:
            log.info(
                "plan: the checkout is at %s, not at the last deployed commit", _short(plan.head)
            )
        if plan.commits:
            more = (
                " (newest first; more not shown)"
                if len(plan.commits) > COMMITS_SHOWN
                else " (newest first)"
            )
            log.info("plan: commits%s:", more)
            for line in plan.commits[:COMMITS_SHOWN]:
                log.info("plan:   %s", line)
        log.info(
            "plan: %d file(s) changed; image inputs among them: %s",
            len(plan.changed),
            _names(plan.inputs) if plan.inputs else "none",
        )
        log.info("plan: %s", plan.reason)
        steps = []
        if plan.head != tip:
            steps.append(["git", "merge", "--ff-only", tip])
        if plan.submodules:
            steps.append(["git", *SUBMODULE_UPDATE])
        if plan.rebuild:
            steps.append(commands.build)
        steps += [commands.up, commands.prune]
        for argv in steps:
            log.info("plan: run: %s", shlex.join(argv))
        if not commands.detected:
            log.info(
                "plan: (provisional: the compose command, whether it has --wait, and the project"
                " the prune keeps to are found when deploying)"
            )
        log.info(
            "plan: on failure: back to %s (git reset --keep)%s, up again",
            _short(self.previous),
            ", rebuild" if plan.rebuild else "",
        )

    def apply(self, plan, commands):
        if plan.head != self.tip:
            with self.step("update"):
                self.checkout.git("merge", "--ff-only", "--quiet", self.tip)
        if plan.submodules:
            try:
                with self.step("submodules"):
                    self.checkout.update_submodules()
            except DeployError as err:
                raise self.nothing_deployed("submodule update", plan, err) from None
        if plan.rebuild:
            self.state.mark(BUILD_MARK, self.tip)
            try:
                self.run_step("build", commands.build, BUILD_TIMEOUT)
            except DeployError as err:
                raise self.nothing_deployed("build", plan, err) from None
            self.built = True
        self.state.mark(UP_MARK, self.tip)
        try:
            self.run_step("up", commands.up, commands.up_timeout)
        except DeployError as err:
            self.roll_back(commands, err)
            raise DeployError(
                f"up failed, rolled back to {_short(self.previous)}{self.off_history(plan)}: {err}"
            ) from None
        with self.step("record"):
            self.state.write_record(self.entry(EXIT_OK))
            self.state.clear(BUILD_MARK)
            self.state.clear(UP_MARK)
            self.state.append_history(self.entry(EXIT_OK))
        try:
            self.run_step("prune", commands.prune, PRUNE_TIMEOUT)
        except DeployError as err:
            log.warning("warning: image prune failed (the deploy stands): %s", err)
        log.info("deployed %s in %.2f s", self.tip, time.monotonic() - self.started)
        return EXIT_OK

    def nothing_deployed(self, what, plan, cause):
        """The error for `what` failing before any container changed; puts the tree back first."""
        self.restore_tree(f"the {what} failed", cause)
        return DeployError(
            f"{what} failed, nothing deployed, the running containers left alone, the checkout"
            f" back at {_short(self.previous)}{self.off_history(plan)}: {cause}"
        )

    def off_history(self, plan):
        """The error's note when `previous`, put back, is no longer in the branch's history."""
        if not plan.previous_off_history:
            return ""
        tracking = f"{self.opts.remote}/{self.opts.branch}"
        return (
            f" (not in the history of {tracking}, which was force-pushed: the next deploy will"
            f" refuse as force-pushed; to deploy the next push, run"
            f" `git -C {shlex.quote(self.checkout.dir)} reset --keep {tracking}` first)"
        )

    def restore_tree(self, why, cause):
        try:
            with self.step("restore"):
                self.checkout.git("reset", "--keep", "--quiet", self.previous)
                if self.checkout.has_submodules(self.previous):
                    self.checkout.update_submodules()
        except DeployError as err:
            raise self.rollback_failed(f"{why} ({cause})", err) from None

    def roll_back(self, commands, cause):
        """Bring the previous commit up again; EXIT_ROLLBACK_FAILED if that fails too."""
        log.info("rolling back to %s", _short(self.previous))
        self.restore_tree("up failed", cause)
        try:
            if self.built:
                # The images hold the new code now. No --pull: rebuild what ran before.
                self.run_step("rollback build", commands.rollback_build, BUILD_TIMEOUT)
            self.run_step("rollback up", commands.up, commands.up_timeout)
        except DeployError as err:
            raise self.rollback_failed(f"up failed ({cause})", err) from None
        self.state.clear(UP_MARK)
        if self.built:
            self.state.clear(BUILD_MARK)

    def rollback_failed(self, why, err):
        return DeployError(
            f"ROLLBACK FAILED, THE SITE MAY BE DOWN: {why}; putting {_short(self.previous)} back"
            f" failed too: {err}; a person must look now (`compose ps` in {self.opts.app_dir})",
            EXIT_ROLLBACK_FAILED,
        )

    def entry(self, code, reason=None):
        """A record of this run for last-deployed.json or history.jsonl."""
        entry = {
            "time": _utc_now(),
            "result": RESULTS[code],
            "commit": self.tip,
            "previous": self.previous,
            "remote": self.opts.remote,
            "branch": self.opts.branch,
            "built": self.built,
            "seconds": round(time.monotonic() - self.started, 3),
            "steps": self.steps,
        }
        if reason:
            entry["reason"] = reason
        if self.trigger:
            entry["trigger"] = self.trigger
        return entry


def _seconds(value, digits):
    """`value` as "1.23 s"; "?" when it is no number (a record edited by hand, a newer format)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return f"{value:.{digits}f} s"
    return "?"


def show_status(checkout, state):
    """Print the last deploy and the recent runs, for a person: whatever the files hold."""
    try:
        record = state.last_deployed()
    except DeployError as err:
        print(f"last deployed: unreadable: {err}")
    else:
        if record is None:
            print("never deployed")
        else:
            _show_record(record)
    head = checkout.git("rev-parse", "HEAD", "--abbrev-ref", "HEAD", check=False).stdout.split()
    if len(head) == 2:
        print(f"checkout: {head[1]} at {head[0]}")
    if state.marked(UP_MARK):
        print("note: a deploy was cut short while recreating the containers; the next deploy redoes it")
    if state.marked(BUILD_MARK):
        print("note: a build did not finish; the next deploy rebuilds")
    entries = state.history(HISTORY_SHOWN)
    if not entries:
        print("no runs recorded")
        return
    print(f"last {len(entries)} run(s), oldest first:")
    for entry in entries:
        print(_history_line(entry))


def _show_record(record):
    steps = record.get("steps")
    took = ", ".join(
        f"{step.get('step', '?')} {_seconds(step.get('seconds'), 2)}"
        for step in (steps if isinstance(steps, list) else [])
        if isinstance(step, dict)
    )
    print(
        f"last deployed: {record['commit']} from {record.get('remote')}/{record.get('branch')}"
        f" at {record.get('time')}, {'with' if record.get('built') else 'without'} a build"
    )
    print(f"  took {_seconds(record.get('seconds'), 2)}: {took}")
    trigger = record.get("trigger")
    if isinstance(trigger, dict) and trigger:
        print("  trigger: " + ", ".join(f"{key} {value}" for key, value in trigger.items()))


def _history_line(entry):
    commit = str(entry["commit"]) if entry.get("commit") else None
    line = f"  {entry.get('time')}  {entry.get('result')}  {_short(commit)}"
    if entry.get("seconds") is not None:
        line += f"  {_seconds(entry['seconds'], 1)}"
    delivery = entry["trigger"].get("delivery") if isinstance(entry.get("trigger"), dict) else None
    if delivery:
        line += f"  delivery {delivery}"
    if entry.get("reason"):
        line += f"  {entry['reason']}"
    return line


def check_settings(opts, environ):
    """--check: what can be told without running git (which may refuse another
    user's checkout), docker or the network; the settings were checked already."""
    if not os.path.isdir(opts.app_dir):
        raise DeployError(f"app dir {opts.app_dir} does not exist or is not a folder", EXIT_USAGE)
    folder = opts.app_dir
    while not os.path.exists(os.path.join(folder, ".git")):
        if os.path.dirname(folder) == folder:
            raise DeployError(
                f"app dir {opts.app_dir} is not a git checkout (no .git in it or above it)",
                EXIT_USAGE,
            )
        folder = os.path.dirname(folder)
    check_compose_file(opts, environ)
    print(f"settings ok: deploys {opts.remote}/{opts.branch} in {opts.app_dir} (--build {opts.build})")
    return EXIT_OK


def deploy(opts, environ):
    """Run one deploy (or --status, --check); return the exit status."""
    if opts.check:
        return check_settings(opts, environ)
    checkout = Checkout(opts.app_dir, environ)
    checkout.open()
    state = State(checkout.git_dir)
    if opts.status:
        show_status(checkout, state)
        # Now rather than at exit, so that a reader gone away (`| head -1`)
        # reaches main as BrokenPipeError.
        sys.stdout.flush()
        return EXIT_OK
    deployment = Deployment(opts, checkout, state, environ)
    try:
        check_compose_file(opts, environ)
        checkout.use_remote(opts.remote)
        return deployment.run()
    except DeployError as err:
        if not opts.dry_run:
            try:
                state.append_history(deployment.entry(err.code, reason=str(err)))
            except DeployError as history_err:
                log.warning("warning: %s", history_err)
        raise


def _drop_stdout():
    """Point stdout at /dev/null, or Python's flush at exit prints a BrokenPipeError."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def main(argv=None):
    for stream in (sys.stdout, sys.stderr):
        stream.reconfigure(errors="backslashreplace")
    # A log reader that went away (the watcher killed) must not fill the
    # rest of the deploy with tracebacks: the deploy carries on regardless.
    logging.raiseExceptions = False
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    try:
        opts = resolve_options(build_parser().parse_args(argv), os.environ)
        return deploy(opts, os.environ)
    except DeployError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return err.code
    except KeyboardInterrupt:
        # The child died with us (PDEATHSIG); the next run picks up from here.
        print("error: interrupted; the next deploy carries on from here", file=sys.stderr, flush=True)
        return 128 + signal.SIGINT
    except BrokenPipeError:
        # Whoever read stdout went away (`--status | head -1`): nothing left to tell it.
        _drop_stdout()
        return 128 + signal.SIGPIPE
    finally:
        log.removeHandler(handler)


if __name__ == "__main__":
    raise SystemExit(main())
