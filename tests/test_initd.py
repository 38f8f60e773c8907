"""Tests for webhook-watcher.initd under real OpenRC (openrc-run and
supervise-daemon), as root.

Each test installs the init script under a unique service name with its own
/etc/conf.d file pointing at temp folders, the real watch_deploy.py (run by
this test's Python, which has inotify_simple) and the stub deploy of
test_watch_deploy, and always removes both files at the end. Services run
with --nodeps: `need docker` cannot be met by Debian's sysv docker script
here (see ENVIRONMENT.md), so depend() is checked on its own.
"""

import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, openrc_available, require
from test_watch_deploy import SHA, read_records, trigger_json, wait_until, write_stub

INITD = ROOT / "webhook-watcher.initd"
CONFD = ROOT / "webhook-watcher.confd"
WAIT_SECONDS = 20


def cmdline(pid):
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:  # ended meanwhile
        return []


def parent(pid):
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except OSError:
        return None


def supervisor_pids(service):
    """The supervise-daemon processes of this service (its name is argv[1]);
    not the fork that is about to become a respawned watcher."""
    found = set()
    for entry in Path("/proc").iterdir():
        argv = cmdline(entry.name) if entry.name.isdigit() else []
        if len(argv) > 1 and argv[0].endswith(b"supervise-daemon") and argv[1] == service.encode():
            found.add(int(entry.name))
    return [pid for pid in found if parent(pid) not in found]


def watcher_pids(supervisor):
    """The supervisor's children that run the watcher (pgrep -f would match the supervisor too)."""
    result = subprocess.run(["pgrep", "-P", str(supervisor)], capture_output=True, text=True)
    pids = [int(line) for line in result.stdout.split()]
    return [pid for pid in pids if cmdline(pid)[:1] == [sys.executable.encode()]]


def alive(pid):
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"  # a zombie has ended


class Service:
    """One installed copy of the init script, with its conf.d file."""

    def __init__(self, root):
        self.name = f"webhook-watcher-test-{secrets.token_hex(4)}"
        self.script = Path("/etc/init.d") / self.name
        self.confd = Path("/etc/conf.d") / self.name
        self.shared = root / "shared"
        self.shared.mkdir()
        self.trigger = self.shared / "deploy_trigger.txt"
        self.log = root / "watcher.log"
        self.stub_log = root / "deploys.jsonl"
        # Open unless a test closes it to hold a deploy.
        self.gate = root / "gate"
        self.gate.touch()
        _stub, self.deploy_command = write_stub(root)
        self.started_pids = set()

    def settings(self, text="", **overrides):
        """conf.d text: `text`, then this test's settings (None leaves one out)."""
        values = {
            "WATCHER_PYTHON": sys.executable,
            "WATCHER_SCRIPT": str(ROOT / "watch_deploy.py"),
            "WATCHER_LOG": str(self.log),
            "respawn_delay": "1",
            "DEPLOY_WATCH_DIR": str(self.shared),
            "DEPLOY_APP_DIR": "/srv/app-under-test",
            "DEPLOY_BRANCH": "release",
            "DEPLOY_COMMAND": self.deploy_command,
        }
        values.update(overrides)
        lines = [f"{name}='{value}'" for name, value in values.items() if value is not None]
        # Not a DEPLOY_* name: it needs its own export, as the conf.d example says.
        lines.append(f"export STUB_LOG='{self.stub_log}'")
        lines.append(f"export STUB_GATE='{self.gate}'")
        return text + "\n".join(lines) + "\n"

    def install(self, text="", **overrides):
        self.script.write_bytes(INITD.read_bytes())
        self.script.chmod(0o755)
        self.confd.write_text(self.settings(text, **overrides))

    def rc(self, *command, check=True):
        result = subprocess.run(
            [str(self.script), "--nodeps", *command],
            capture_output=True,
            text=True,
            timeout=WAIT_SECONDS * 3,
        )
        if check:
            assert result.returncode == 0, result.stdout + result.stderr
        return result

    def supervisor(self):
        (pid,) = supervisor_pids(self.name)
        self.started_pids.add(pid)
        return pid

    def watcher(self):
        wait_until(lambda: len(watcher_pids(self.supervisor())) == 1, "the supervised watcher")
        (pid,) = watcher_pids(self.supervisor())
        self.started_pids.add(pid)
        return pid

    def log_text(self):
        return self.log.read_text() if self.log.exists() else ""

    def wait_for_log(self, text, count=1):
        wait_until(lambda: self.log_text().count(text) >= count, repr(text), WAIT_SECONDS)

    def start(self, text="", **overrides):
        self.install(text, **overrides)
        self.rc("start")
        self.wait_for_log(f"watching {self.shared} ")

    def cleanup(self):
        self.gate.touch()
        if self.script.exists():
            self.rc("stop", check=False)
            self.rc("zap", check=False)
        for pid in self.started_pids | set(supervisor_pids(self.name)):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for path in (self.script, self.confd):
            if path.exists():
                path.unlink()


@pytest.fixture
def service(tmp_path):
    require(openrc_available(), "OpenRC (openrc-run, supervise-daemon) is not installed")
    require(os.geteuid() == 0, "OpenRC services need root")
    # OpenRC runs no service on a machine it did not boot without its run state.
    Path("/run/openrc").mkdir(parents=True, exist_ok=True)
    Path("/run/openrc/softlevel").touch()
    Path("/etc/conf.d").mkdir(exist_ok=True)
    service = Service(tmp_path)
    yield service
    service.cleanup()


def test_openrc_reads_the_depend_declaration(service):
    service.install()
    result = service.rc("depend")
    assert result.stdout.split("\n") == ["need docker", "after net", ""]


def test_start_runs_the_watcher_under_supervise_daemon(service):
    service.start()
    status = service.rc("status")
    assert "status: started" in status.stdout + status.stderr
    watcher = service.watcher()
    assert cmdline(watcher)[:2] == [sys.executable.encode(), str(ROOT / "watch_deploy.py").encode()]
    log = service.log.stat()
    assert (log.st_uid, log.st_mode & 0o777) == (0, 0o640)


def test_conf_d_settings_reach_the_watcher_and_the_deploy(service):
    service.start()
    service.trigger.write_text(trigger_json("through-openrc"))
    wait_until(lambda: read_records(service.stub_log, "end"), "the deploy", WAIT_SECONDS)
    (start,) = read_records(service.stub_log, "start")
    env = start["env"]
    assert env["DEPLOY_APP_DIR"] == "/srv/app-under-test"
    assert env["DEPLOY_BRANCH"] == "release"
    assert env["DEPLOY_WATCH_DIR"] == str(service.shared)
    assert env["DEPLOY_SHA"] == SHA and env["DEPLOY_DELIVERY"] == "through-openrc"
    service.wait_for_log("deploy succeeded in ")
    assert "  | stub output line" in service.log_text()


def test_each_log_line_is_written_once(service):
    service.start()
    service.trigger.write_text(trigger_json("once"))
    service.wait_for_log("deploy succeeded in ")
    log = service.log_text()
    assert log.count("watching ") == 1 and log.count("  | stub error line") == 1


def test_killed_watcher_is_respawned(service):
    service.start()
    first = service.watcher()
    os.kill(first, signal.SIGKILL)
    wait_until(lambda: watcher_pids(service.supervisor()) not in ([], [first]), "a new watcher")
    second = service.watcher()
    assert second != first
    service.wait_for_log(f"watching {service.shared} ", count=2)
    service.trigger.write_text(trigger_json("after-respawn"))
    wait_until(
        lambda: read_records(service.stub_log, "end"), "a deploy by the new watcher", WAIT_SECONDS
    )


def test_stop_leaves_no_process_behind(service):
    service.start()
    supervisor, watcher = service.supervisor(), service.watcher()
    service.rc("stop")
    assert not alive(supervisor) and not alive(watcher)
    assert supervisor_pids(service.name) == []
    status = service.rc("status", check=False)
    assert status.returncode == 3 and "status: stopped" in status.stdout + status.stderr


def test_stop_waits_for_the_running_deploy(service):
    service.gate.unlink()
    service.start()
    service.trigger.write_text(trigger_json("running"))
    wait_until(lambda: read_records(service.stub_log, "start"), "the deploy to start", WAIT_SECONDS)
    watcher = service.watcher()
    stopping = subprocess.Popen(
        [str(service.script), "--nodeps", "stop"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    try:
        service.wait_for_log("SIGTERM received: waiting for the running deploy to finish")
        # Past supervise-daemon's default of SIGKILL after 5 s: only the
        # service's own retry keeps the watcher waiting this long.
        time.sleep(6)
        assert stopping.poll() is None and alive(watcher)
        service.gate.touch()
        assert stopping.wait(timeout=WAIT_SECONDS) == 0
    finally:
        if stopping.poll() is None:
            stopping.kill()
    assert [end["status"] for end in read_records(service.stub_log, "end")] == [0]
    assert "deploy succeeded in " in service.log_text()
    assert supervisor_pids(service.name) == []


def start_fails(service, **overrides):
    service.install(**overrides)
    result = service.rc("start", check=False)
    assert result.returncode != 0
    assert supervisor_pids(service.name) == []
    return result.stdout + result.stderr


def test_start_fails_clearly_without_watch_dir(service):
    output = start_fails(service, DEPLOY_WATCH_DIR=None)
    assert f"DEPLOY_WATCH_DIR is not set: set it in /etc/conf.d/{service.name}" in output


def test_start_fails_clearly_on_a_missing_watch_dir(service):
    missing = service.shared / "missing"
    output = start_fails(service, DEPLOY_WATCH_DIR=str(missing))
    assert f"DEPLOY_WATCH_DIR {missing} is not a folder" in output


def test_start_fails_clearly_without_inotify_simple(service, tmp_path):
    bare = tmp_path / "bare-venv"
    subprocess.run(
        [sys.executable, "-m", "venv", "--without-pip", str(bare)], check=True, timeout=60
    )
    python = bare / "bin" / "python"
    output = start_fails(service, WATCHER_PYTHON=str(python))
    assert (
        f"inotify_simple is not installed: run `{python} -m pip install inotify_simple`" in output
    )


def test_start_fails_clearly_on_a_bad_poll_value(service):
    output = start_fails(service, DEPLOY_POLL="abc")
    assert "--poll/DEPLOY_POLL must be a number of seconds" in output


def test_start_fails_clearly_while_another_watcher_holds_the_folder(service):
    other = subprocess.Popen(
        [sys.executable, str(ROOT / "watch_deploy.py"), "--poll", "60", "--watch-dir", str(service.shared)],
        stderr=subprocess.PIPE, text=True,
    )
    try:
        wait_until(lambda: other.poll() is not None or "watching " in (other.stderr.readline() or ""),
                   "the other watcher", WAIT_SECONDS)
        output = start_fails(service)
    finally:
        other.terminate()
        other.wait(timeout=WAIT_SECONDS)
    assert f"another watcher is already running on {service.shared}" in output


def test_start_fails_clearly_on_a_bad_deploy_setting(service, tmp_path):
    app = tmp_path / "app"
    (app / ".git").mkdir(parents=True)
    (app / "compose.yaml").write_text("services: {}\n")
    output = start_fails(
        service, DEPLOY_COMMAND=None, DEPLOY_APP_DIR=str(app), DEPLOY_BUILD="alwyas"
    )
    assert "DEPLOY_BUILD: unknown build mode 'alwyas'" in output


def test_watcher_script_in_a_folder_with_spaces_runs(service, tmp_path):
    spaced = tmp_path / "web hook" / "watch_deploy.py"
    spaced.parent.mkdir()
    spaced.write_bytes((ROOT / "watch_deploy.py").read_bytes())
    service.start(WATCHER_SCRIPT=str(spaced))
    assert str(spaced).encode() in cmdline(service.watcher())


def test_example_conf_d_works_once_its_placeholders_are_set(service):
    example = CONFD.read_text()
    example = example.replace("/home/USERNAME/shared", str(service.shared))
    example = example.replace("/home/USERNAME/PROJECT", "/srv/example-app")
    # Only what differs on this test machine is added after the example.
    service.start(example, DEPLOY_WATCH_DIR=None, DEPLOY_APP_DIR=None, DEPLOY_BRANCH=None)
    service.trigger.write_text(trigger_json("example"))
    wait_until(lambda: read_records(service.stub_log, "end"), "the deploy", WAIT_SECONDS)
    (start,) = read_records(service.stub_log, "start")
    assert start["env"]["DEPLOY_APP_DIR"] == "/srv/example-app"
    assert "DEPLOY_BRANCH" not in start["env"]
