#!/usr/bin/env python3
"""Watch the shared folder for a deploy trigger and run the deploy command.

The web container's webhook view writes a trigger file (JSON naming the
pushed commit) into a folder it shares with the host. This watcher runs on
the host in the foreground (a supervisor such as OpenRC's supervise-daemon
runs it), sees the trigger through inotify, or by scanning with --poll, and
runs the deploy command: one deploy per trigger, and triggers that arrive
while a deploy runs give exactly one more deploy after it.

Inputs: the options below; each flag overrides its environment variable.
The trigger's content is untrusted: at most 4096 bytes are read, never
through a symlink, and only well-formed fields reach the deploy command, as
DEPLOY_SHA, DEPLOY_REF and DEPLOY_DELIVERY. The rest of the watcher's
environment is passed on to the deploy command as it is.

Outputs: timestamped log lines on stderr (and appended to --log-file), the
deploy command's output (stdout and stderr) copied into them line by line.
Exit status: 0 stopped by SIGTERM or SIGINT; 1 the watch folder was deleted,
moved or replaced (the supervisor restarts the watcher), or another runtime
failure; 2 bad usage or configuration (a missing folder, inotify_simple
missing); 4 another watcher holds this folder. With --once: 0 when no
trigger was pending, else the last deploy's exit status (1 if it could not
be started or was killed).

Side effects: a trigger is claimed by renaming it to ".<trigger>.claimed" in
the same folder (fsynced, so a deploy cut short by a crash or a power cut runs
again at the next start); the claim is removed when its deploy ends. The
folder is locked (flock) while the watcher runs. The deploy command runs in
its own session, so a signal meant for the watcher never stops a deploy
half-way: the watcher waits for it, then exits.
"""

import argparse
import fcntl
import json
import logging
import os
import re
import select
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

log = logging.getLogger(__name__)

DEFAULT_TRIGGER_NAME = "deploy_trigger.txt"
DEFAULT_DEPLOY_SCRIPT = Path(__file__).resolve().with_name("deploy.py")
MAX_TRIGGER_BYTES = 4096
# A longer line of deploy output is logged in pieces of this many bytes.
MAX_OUTPUT_LINE_BYTES = 8192
# Upper bound of --poll, in seconds.
MAX_POLL_SECONDS = 3600.0

# Environment variable, trigger key, accepted value (matched in full).
TRIGGER_FIELDS = (
    ("DEPLOY_SHA", "after", re.compile(r"[0-9a-f]{40}|[0-9a-f]{64}")),
    ("DEPLOY_REF", "ref", re.compile(r"refs/[A-Za-z0-9._/-]{1,200}")),
    ("DEPLOY_DELIVERY", "delivery", re.compile(r"[A-Za-z0-9-]{1,100}")),
)

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_LOCKED = 4


class WatchError(Exception):
    """An expected failure: one line for the log, and the exit status."""

    def __init__(self, message, status=EXIT_FAILED):
        super().__init__(message)
        self.status = status


class LogFormatter(logging.Formatter):
    """Timestamp every line; name warnings and errors as such."""

    def __init__(self):
        super().__init__("%(asctime)s.%(msecs)03d %(message)s", "%Y-%m-%d %H:%M:%S")

    def formatMessage(self, record):
        if record.levelno >= logging.ERROR:
            record.message = "error: " + record.message
        elif record.levelno >= logging.WARNING:
            record.message = "warning: " + record.message
        return super().formatMessage(record)


def add_log_handler(handler):
    handler.setFormatter(LogFormatter())
    log.addHandler(handler)


def env_value(environ, name):
    """The variable's value; unset and empty (a commented-out setting) are alike."""
    return environ.get(name) or None


def build_parser(environ):
    parser = argparse.ArgumentParser(
        description="Run the deploy command when the webhook's trigger file appears "
        "in the shared folder. Each flag overrides its environment variable.",
    )
    parser.add_argument(
        "--watch-dir",
        default=env_value(environ, "DEPLOY_WATCH_DIR"),
        help="the host side of the shared folder (DEPLOY_WATCH_DIR; required)",
    )
    parser.add_argument(
        "--trigger-name",
        default=env_value(environ, "DEPLOY_TRIGGER_NAME") or DEFAULT_TRIGGER_NAME,
        help="the trigger's file name in that folder "
        f"(DEPLOY_TRIGGER_NAME; default {DEFAULT_TRIGGER_NAME})",
    )
    parser.add_argument(
        "--deploy-command",
        default=env_value(environ, "DEPLOY_COMMAND"),
        help="the command line to run for a deploy, split like a shell would but never "
        "run by one (DEPLOY_COMMAND; default: deploy.py beside this script, "
        "run with this Python)",
    )
    parser.add_argument(
        "--log-file",
        default=env_value(environ, "DEPLOY_LOG_FILE"),
        help="also append the log to this file (DEPLOY_LOG_FILE; stderr always)",
    )
    parser.add_argument(
        "--poll",
        metavar="SECONDS",
        default=env_value(environ, "DEPLOY_POLL"),
        help="scan the folder every SECONDS instead of using inotify, for folders whose "
        "writes raise no inotify events: network filesystems, Docker Desktop "
        "file sharing (DEPLOY_POLL)",
    )
    parser.add_argument(
        "--once",
        action="store_true",
        help="deploy if a trigger is pending, then exit with the deploy's status",
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="set DEPLOY_DRY_RUN=1 for the deploy command (deploy.py then changes nothing)",
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="check the settings, the folder and that no other watcher runs on it, then exit "
        "(the service runs this before it starts the watcher)",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="also log every inotify event")
    return parser


def check_options(args):
    """Validate the options together; raises WatchError (usage) on the first bad one."""
    if not args.watch_dir:
        raise WatchError("no watch folder: pass --watch-dir or set DEPLOY_WATCH_DIR", EXIT_USAGE)
    name = args.trigger_name
    if "/" in name or name in ("", ".", ".."):
        raise WatchError(
            f"--trigger-name/DEPLOY_TRIGGER_NAME must be a plain file name, not {name!r}",
            EXIT_USAGE,
        )
    if args.poll is not None:
        try:
            seconds = float(args.poll)
        except ValueError:
            seconds = 0.0
        if not 0 < seconds <= MAX_POLL_SECONDS:
            raise WatchError(
                f"--poll/DEPLOY_POLL must be a number of seconds above 0 and at most "
                f"{MAX_POLL_SECONDS:g}, not {args.poll!r}",
                EXIT_USAGE,
            )
        args.poll = seconds
    if args.deploy_command is None:
        args.deploy_argv = [sys.executable, str(DEFAULT_DEPLOY_SCRIPT)]
    else:
        try:
            args.deploy_argv = shlex.split(args.deploy_command)
        except ValueError as error:
            raise WatchError(f"--deploy-command/DEPLOY_COMMAND: {error}", EXIT_USAGE)
        if not args.deploy_argv:
            raise WatchError("--deploy-command/DEPLOY_COMMAND is empty", EXIT_USAGE)
    return args


def open_log_file(path):
    try:
        add_log_handler(logging.FileHandler(path, encoding="utf-8"))
    except OSError as error:
        raise WatchError(f"cannot open the log file {path}: {error.strerror}", EXIT_USAGE)


def load_inotify():
    """Import inotify_simple only in inotify mode, so --poll and --once run without it."""
    try:
        import inotify_simple
    except ImportError:
        raise WatchError(
            f"inotify_simple is not installed: run `{sys.executable} -m pip install "
            "inotify_simple` (or use --poll SECONDS)",
            EXIT_USAGE,
        )
    return inotify_simple


def parse_trigger(content):
    """The well-formed fields of a trigger, as environment variables for the deploy."""
    try:
        data = json.loads(content.decode("utf-8"))
    # ValueError includes UnicodeDecodeError; RecursionError: "[[[[..." nested too deep.
    except (ValueError, RecursionError):
        return {}
    if not isinstance(data, dict):
        return {}
    fields = {}
    for variable, key, pattern in TRIGGER_FIELDS:
        value = data.get(key)
        if isinstance(value, str) and pattern.fullmatch(value):
            fields[variable] = value
    return fields


def describe_trigger(fields):
    """The "trigger seen" log line: the commit and delivery when the trigger names them."""
    if "DEPLOY_SHA" not in fields:
        return "trigger seen (it names no commit)"
    line = f"trigger seen: commit {fields['DEPLOY_SHA'][:12]}"
    if "DEPLOY_REF" in fields:
        line += f" on {fields['DEPLOY_REF']}"
    if "DEPLOY_DELIVERY" in fields:
        line += f" (delivery {fields['DEPLOY_DELIVERY']})"
    return line


def deploy_environment(fields, dry_run):
    """The watcher's environment, with only this trigger's fields set."""
    env = dict(os.environ)
    # A stale value (say, from conf.d) must not pass for this trigger's.
    for variable, _key, _pattern in TRIGGER_FIELDS:
        env.pop(variable, None)
    env.update(fields)
    if dry_run:
        env["DEPLOY_DRY_RUN"] = "1"
    return env


def file_kind(mode):
    for test, kind in (
        (stat.S_ISREG, "file"),
        (stat.S_ISLNK, "symlink"),
        (stat.S_ISDIR, "directory"),
        (stat.S_ISFIFO, "fifo"),
        (stat.S_ISSOCK, "socket"),
        (stat.S_ISCHR, "device"),
        (stat.S_ISBLK, "device"),
    ):
        if test(mode):
            return kind
    return "special file"


class TriggerFolder:
    """The locked watch folder, and the trigger and claim inside it.

    Every operation goes through the locked folder's descriptor, so it acts on
    the folder that was locked and watched even if its path changes.
    """

    def __init__(self, path, trigger_name):
        self.path = path
        self.trigger_name = trigger_name
        self.claim_name = f".{trigger_name}.claimed"
        try:
            self.fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise WatchError(f"the watch folder {path} does not exist", EXIT_USAGE)
        except NotADirectoryError:
            raise WatchError(f"the watch folder {path} is not a folder", EXIT_USAGE)
        except OSError as error:
            raise WatchError(f"cannot open the watch folder {path}: {error.strerror}", EXIT_USAGE)
        # Locking the folder itself needs no lock file in a folder the
        # container can write, and catches a second watcher given another path.
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise WatchError(f"another watcher is already running on {path}", EXIT_LOCKED)
        except OSError as error:
            # Some network filesystems cannot lock a folder: --poll must still work there.
            log.warning(
                "cannot lock %s (%s): a second watcher would not be refused", path, error.strerror
            )
        self.identity = self._identity(os.fstat(self.fd))

    @staticmethod
    def _identity(st):
        return st.st_dev, st.st_ino

    @property
    def fd_path(self):
        """A path that names the locked folder itself, whatever happens to `path`."""
        return f"/proc/self/fd/{self.fd}"

    def gone(self):
        """Why the folder can no longer be watched, or None (for --poll's scans)."""
        if os.fstat(self.fd).st_nlink == 0:
            return "deleted"
        try:
            current = self._identity(os.stat(self.path))
        except FileNotFoundError:
            return "deleted or moved away"
        return None if current == self.identity else "replaced, moved or unmounted"

    def _claim_exists(self):
        try:
            os.lstat(self.claim_name, dir_fd=self.fd)
        except FileNotFoundError:
            return False
        return True

    def take_claim(self):
        """Claim a pending trigger; True when a claim (new or left by a crash) awaits its deploy."""
        leftover = self._claim_exists()
        try:
            os.rename(self.trigger_name, self.claim_name, src_dir_fd=self.fd, dst_dir_fd=self.fd)
        except FileNotFoundError:
            if leftover:
                log.warning("found the claim of a deploy that was cut short: running it again")
            return leftover
        except OSError as error:
            # A directory on one side: the claim is dealt with (and cleared)
            # first, and the trigger gets its turn on the next pass.
            if leftover:
                return True
            raise WatchError(f"cannot claim {self.trigger_name} in {self.path}: {error.strerror}")
        if leftover:
            log.warning(
                "found the claim of a deploy that was cut short: a newer trigger replaces it"
            )
        # The rename must reach the disk before the deploy starts, or a power
        # cut could bring the trigger back unclaimed or lose it.
        os.fsync(self.fd)
        return True

    def read_claim(self):
        """The claim's file kind, and its content (None unless a file of at most 4096 bytes)."""
        try:
            # O_PATH opens nothing: no fifo blocks, no device acts on an open.
            path_fd = os.open(
                self.claim_name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=self.fd
            )
        except FileNotFoundError:
            return "vanished file", None
        try:
            kind = file_kind(os.fstat(path_fd).st_mode)
            if kind != "file":
                return kind, None
            # Reopening through /proc reads the very inode just checked: the
            # container cannot swap in a fifo or a device in between.
            flags = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
            try:
                fd = os.open(f"/proc/self/fd/{path_fd}", flags)
            except OSError as error:
                log.warning("cannot read %s: %s", self.trigger_name, error.strerror)
                return kind, None
            try:
                content = os.read(fd, MAX_TRIGGER_BYTES + 1)
                while len(content) <= MAX_TRIGGER_BYTES:
                    more = os.read(fd, MAX_TRIGGER_BYTES + 1 - len(content))
                    if not more:
                        break
                    content += more
            finally:
                os.close(fd)
        finally:
            os.close(path_fd)
        if len(content) > MAX_TRIGGER_BYTES:
            log.warning("the trigger is over %d bytes: its content is ignored", MAX_TRIGGER_BYTES)
            return kind, None
        return kind, content

    def drop_claim(self, kind):
        try:
            if kind == "directory":
                # Never delete what may hold someone's files: move it aside.
                aside = f".{self.trigger_name}.not-a-file.{time.strftime('%Y%m%d-%H%M%S')}"
                os.rename(self.claim_name, aside, src_dir_fd=self.fd, dst_dir_fd=self.fd)
                log.warning("moved the directory aside to %s/%s", self.path, aside)
            else:
                os.unlink(self.claim_name, dir_fd=self.fd)
        except FileNotFoundError:
            pass
        except OSError as error:
            # Left in place, it would be deployed again and again.
            raise WatchError(
                f"cannot remove {self.claim_name} from {self.path}: {error.strerror}: "
                "remove it by hand"
            )


class StopSignals:
    """Record SIGTERM and SIGINT for the main loop, and wake its poll() on them.

    The handlers only record (as gunicorn's arbiter does); the loop acts.
    Python retries a poll() that a signal interrupted, so a pipe written on
    every signal (set_wakeup_fd) is what wakes it; SIGCHLD writes there too,
    which tells the loop that the deploy ended.
    """

    def __init__(self):
        self.received = None
        self.wakeup_fd, write_fd = os.pipe()
        os.set_blocking(self.wakeup_fd, False)
        os.set_blocking(write_fd, False)
        signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._record)
        signal.signal(signal.SIGCHLD, lambda signum, frame: None)

    def _record(self, signum, frame):
        if self.received is None:
            self.received = signal.Signals(signum).name

    def drain(self):
        try:
            while os.read(self.wakeup_fd, 512):
                pass
        except BlockingIOError:
            pass


class OutputCopier:
    """Copy the deploy's output into the log line by line, as it comes."""

    def __init__(self, fd):
        self.fd = fd
        self.partial = b""
        self.open = True

    def _log(self, line):
        log.info("  | %s", line.decode("utf-8", "replace").rstrip("\r"))

    def read_available(self):
        """Log every complete line now readable; at end of output, the rest too."""
        while self.open:
            try:
                chunk = os.read(self.fd, 65536)
            except BlockingIOError:
                return
            if not chunk:
                self.open = False
                self.flush()
                return
            lines = (self.partial + chunk).split(b"\n")
            self.partial = lines.pop()
            for line in lines:
                self._log(line)
            while len(self.partial) > MAX_OUTPUT_LINE_BYTES:
                self._log(self.partial[:MAX_OUTPUT_LINE_BYTES])
                self.partial = self.partial[MAX_OUTPUT_LINE_BYTES:]

    def flush(self):
        if self.partial:
            self._log(self.partial)
            self.partial = b""


def run_deploy(argv, env, signals):
    """Run one deploy to its end; returns its exit status (negative: killed by
    that signal; 1 when it could not be started, after logging why).

    No timeout: killing a deploy half-way could leave the site down, and
    deploy.py bounds each of its own steps.
    """
    log.info("deploy started: %s", shlex.join(argv))
    started = time.monotonic()
    try:
        # Its own session: a Ctrl-C or the supervisor's SIGTERM meant for the
        # watcher must not stop a deploy half-way.
        child = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    except OSError as error:
        log.error("cannot run the deploy command %s: %s", argv[0], error.strerror or error)
        return EXIT_FAILED
    output = child.stdout.fileno()
    os.set_blocking(output, False)
    copier = OutputCopier(output)
    poller = select.poll()
    poller.register(output, select.POLLIN)
    poller.register(signals.wakeup_fd, select.POLLIN)
    announced_stop = False
    # Wait for the child's exit, not the end of its output: a process it left
    # behind may hold the output open.
    while child.poll() is None:
        poller.poll()
        signals.drain()
        if copier.open:
            copier.read_available()
            if not copier.open:
                poller.unregister(output)
        if signals.received and not announced_stop:
            log.info("%s received: waiting for the running deploy to finish", signals.received)
            announced_stop = True
    copier.read_available()
    copier.flush()
    child.stdout.close()
    status = child.returncode
    elapsed = time.monotonic() - started
    if status == 0:
        log.info("deploy succeeded in %.2f s (exit status 0)", elapsed)
    elif status < 0:
        log.error(
            "deploy killed by %s after %.2f s: it may have stopped half-way; the next"
            " trigger deploys again (redeliver the push on GitHub, or run deploy.py)",
            signal.Signals(-status).name, elapsed,
        )
    else:
        log.error("deploy failed in %.2f s: exit status %d", elapsed, status)
    return status


def deploy_claim(folder, settings, signals):
    """Deploy the claimed trigger, then drop the claim; returns the deploy's status
    (None when the claim was not a file or a symlink: no deploy)."""
    kind, content = folder.read_claim()
    if kind not in ("file", "vanished file", "symlink"):
        log.warning("ignored %s: it is a %s, not a file", folder.trigger_name, kind)
        folder.drop_claim(kind)
        return None
    if kind == "symlink":
        log.info("trigger seen: a symlink, not followed (deploying all the same)")
        fields = {}
    else:
        fields = parse_trigger(content) if content is not None else {}
        log.info("%s", describe_trigger(fields))
    status = run_deploy(settings.deploy_argv, deploy_environment(fields, settings.dry_run), signals)
    folder.drop_claim(kind)
    return status


def deploy_pending(folder, settings, signals):
    """Deploy while a trigger or claim is pending; returns the last deploy's status,
    or None when none ran. A stop request leaves any trigger for the next start."""
    status = None
    while signals.received is None and folder.take_claim():
        result = deploy_claim(folder, settings, signals)
        if result is not None:
            status = result
    return status


def add_watches(inotify, folder, flags):
    """Watch the folder for its trigger, and its parent for the folder going away.

    The lock keeps the folder open, and a folder held open raises no event on
    itself when it is deleted (nor can it be unmounted, short of a lazy
    unmount that waits for the watcher to let go): its deletion shows in its
    parent. Returns the parent's watch descriptor (None if it cannot be
    watched) and the folder's name there.
    """
    try:
        inotify.add_watch(
            folder.fd_path, flags.CLOSE_WRITE | flags.MOVED_TO | flags.MOVE_SELF | flags.ONLYDIR
        )
    except OSError as error:
        raise WatchError(
            f"cannot watch {folder.path} with inotify: {error.strerror} "
            "(raise fs.inotify.max_user_watches or max_user_instances, or use --poll SECONDS)"
        )
    parent, name = os.path.split(os.readlink(folder.fd_path))
    if not name:  # the root folder has no parent to watch
        return None, name
    try:
        parent_wd = inotify.add_watch(
            parent, flags.DELETE | flags.MOVED_FROM | flags.MOVED_TO | flags.ONLYDIR
        )
    except OSError as error:
        log.warning(
            "cannot watch %s (%s): the watch folder's deletion would go unnoticed",
            parent,
            error.strerror,
        )
        return None, name
    return parent_wd, name


def parent_event_reason(mask, flags):
    if mask & flags.DELETE:
        return "deleted"
    if mask & flags.MOVED_FROM:
        return "moved away"
    return "replaced"


def watch_events(folder, settings, signals, inotify_simple):
    flags = inotify_simple.flags
    with inotify_simple.INotify() as inotify:
        parent_wd, folder_name = add_watches(inotify, folder, flags)
        log_start(folder, settings, "inotify")
        # Watching before the first scan: a trigger written in between is seen.
        deploy_pending(folder, settings, signals)
        poller = select.poll()
        poller.register(inotify.fileno(), select.POLLIN)
        poller.register(signals.wakeup_fd, select.POLLIN)
        while signals.received is None:
            poller.poll()
            signals.drain()
            rescan = False
            for event in inotify.read(timeout=0):
                log.debug("inotify event %r, mask %#x", event.name, event.mask)
                if event.mask & flags.Q_OVERFLOW:
                    log.warning("the inotify queue overflowed: scanning the folder")
                    rescan = True
                elif event.wd == parent_wd:
                    if event.name == folder_name:
                        reason = parent_event_reason(event.mask, flags)
                        raise WatchError(f"the watch folder {folder.path} was {reason}: stopping")
                elif event.mask & flags.MOVE_SELF:
                    raise WatchError(f"the watch folder {folder.path} was moved away: stopping")
                elif event.mask & flags.IGNORED:
                    raise WatchError(
                        f"the watch folder {folder.path} can no longer be watched: stopping"
                    )
                elif event.name == folder.trigger_name:
                    rescan = True
            if rescan:
                deploy_pending(folder, settings, signals)
    log.info("%s received: stopping", signals.received)
    return EXIT_OK


def watch_poll(folder, settings, signals):
    log_start(folder, settings, f"poll every {settings.poll:g} s")
    poller = select.poll()
    poller.register(signals.wakeup_fd, select.POLLIN)
    while True:
        deploy_pending(folder, settings, signals)
        if signals.received:
            break
        reason = folder.gone()
        if reason:
            raise WatchError(f"the watch folder {folder.path} was {reason}: stopping")
        poller.poll(settings.poll * 1000)
        signals.drain()
    log.info("%s received: stopping", signals.received)
    return EXIT_OK


def deploy_once(folder, settings, signals):
    log_start(folder, settings, "once")
    status = deploy_pending(folder, settings, signals)
    if status is None:
        log.info("no trigger pending: nothing to deploy")
        return EXIT_OK
    return status if status >= 0 else EXIT_FAILED


def log_start(folder, settings, mode):
    log.info(
        "watching %s for %s (%s%s), pid %d; deploy command: %s",
        folder.path,
        folder.trigger_name,
        mode,
        ", dry run" if settings.dry_run else "",
        os.getpid(),
        shlex.join(settings.deploy_argv),
    )
    for problem in deploy_problems(settings):
        log.warning("%s", problem)


def deploy_problems(settings):
    """What will make every deploy fail, found now rather than at the first push."""
    problems = []
    if shutil.which(settings.deploy_argv[0]) is None:
        problems.append(f"the deploy command {settings.deploy_argv[0]} is not found or not executable")
    if settings.deploy_command is None:
        app_dir = env_value(os.environ, "DEPLOY_APP_DIR")
        if not app_dir:
            problems.append("DEPLOY_APP_DIR is not set: every deploy will fail until it is")
        elif not os.path.isdir(app_dir):
            problems.append(f"DEPLOY_APP_DIR {app_dir} is not a folder: every deploy will fail until it is")
    return problems


def deploy_settings_problems(settings):
    """deploy.py's own --check of the same environment: its error lines, if any."""
    try:
        result = subprocess.run(
            [*settings.deploy_argv, "--check"],
            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60,
        )
    except (OSError, subprocess.TimeoutExpired) as error:
        return [f"cannot check the deploy settings: {error}"]
    if result.returncode == 0:
        return []
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    return [line[len("error: "):] if line.startswith("error: ") else line for line in lines[-3:]]


def check_only(folder, settings):
    """--check: the settings, the folder and its lock are fine, or one error line each."""
    problems = deploy_problems(settings)
    if not problems and settings.deploy_command is None:
        problems = deploy_settings_problems(settings)
    for problem in problems:
        log.error("%s", problem)
    if problems:
        return EXIT_USAGE
    log.info("settings ok: watching %s for %s would work", folder.path, folder.trigger_name)
    return EXIT_OK


def main(argv=None) -> int:
    args = build_parser(os.environ).parse_args(argv)
    add_log_handler(logging.StreamHandler(sys.stderr))
    log.setLevel(logging.DEBUG if args.verbose else logging.INFO)
    try:
        settings = check_options(args)
        if settings.log_file:
            open_log_file(settings.log_file)
        inotify_simple = None if settings.once or settings.poll else load_inotify()
        signals = StopSignals()
        folder = TriggerFolder(settings.watch_dir, settings.trigger_name)
        if settings.check:
            return check_only(folder, settings)
        if settings.once:
            return deploy_once(folder, settings, signals)
        if settings.poll:
            return watch_poll(folder, settings, signals)
        return watch_events(folder, settings, signals, inotify_simple)
    except WatchError as error:
        log.error("%s", error)
        return error.status


if __name__ == "__main__":
    raise SystemExit(main())
