"""Tests for watch_deploy.py: the real watcher run as a program on real
inotify (or --poll) over temp folders, with a stub deploy command that logs
each run (start and end, with timestamps, its session and its DEPLOY_*
environment), can be held at a gate (a file it waits for) and fails with
status N when the trigger's delivery is "fail-N".

Counting deploys: once the triggers under test are claimed, one more
"marker" trigger is written and its deploy awaited. Whatever deploys the earlier triggers
(and their inotify events, queued before the marker's) cause run before it,
so the deploys before the marker are the final count.
"""

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from conftest import ROOT, require

WATCHER = ROOT / "watch_deploy.py"
TRIGGER_NAME = "deploy_trigger.txt"
CLAIM_NAME = ".deploy_trigger.txt.claimed"
SHA = "0123456789abcdef0123456789abcdef01234567"
# Bounds that only stop a broken watcher from hanging the suite.
WAIT_SECONDS = 15

STUB = textwrap.dedent(
    """\
    import json, os, sys, time

    def record(event, **extra):
        line = json.dumps(dict(event=event, pid=os.getpid(), t=time.time(), **extra))
        with open(os.environ["STUB_LOG"], "a") as log:
            log.write(line + "\\n")

    env = {k: v for k, v in os.environ.items() if k.startswith("DEPLOY_")}
    record("start", env=env, sid=os.getsid(0))
    print("stub output line", flush=True)
    print("stub error line", file=sys.stderr, flush=True)
    gate = os.environ.get("STUB_GATE")
    deadline = time.monotonic() + 60
    while gate and not os.path.exists(gate) and time.monotonic() < deadline:
        time.sleep(0.01)
    delivery = env.get("DEPLOY_DELIVERY", "")
    status = int(delivery[len("fail-"):]) if delivery.startswith("fail-") else 0
    record("end", status=status)
    sys.exit(status)
    """
)


def wait_until(condition, what, timeout=WAIT_SECONDS):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def write_stub(folder):
    """The stub deploy script, and the DEPLOY_COMMAND that runs it."""
    stub = folder / "stub_deploy.py"
    stub.write_text(STUB)
    return stub, f"{shlex.quote(sys.executable)} -I -S {shlex.quote(str(stub))}"


def read_records(stub_log, event):
    if not stub_log.exists():
        return []
    records = [json.loads(line) for line in stub_log.read_text().splitlines()]
    return [record for record in records if record["event"] == event]


def trigger_json(delivery=None, sha=SHA, ref="refs/heads/main"):
    """A trigger as the view writes it (the shared contract)."""
    data = {
        "ref": ref,
        "after": sha,
        "before": "f" * 40,
        "delivery": delivery,
        "repository": "owner/app",
        "pusher": "someone",
        "received_at": "2026-12-03T10:41:16Z",
    }
    return json.dumps(data, separators=(",", ":")) + "\n"


class Watcher:
    """A running watch_deploy.py, its stderr in a file."""

    def __init__(self, args, env, log_path, **popen):
        self.log_path = log_path
        with open(log_path, "w") as log:
            self.proc = subprocess.Popen(
                [sys.executable, str(WATCHER), *args],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=log,
                **popen,
            )

    def log(self):
        return self.log_path.read_text()

    def wait_for_log(self, text):
        wait_until(lambda: text in self.log() or self.proc.poll() is not None, repr(text))
        assert text in self.log(), self.log()

    def wait(self):
        return self.proc.wait(timeout=WAIT_SECONDS)


class Box:
    """A shared folder, the stub deploy, and watchers started on them."""

    def __init__(self, root):
        self.root = root
        self.shared = root / "shared"
        self.shared.mkdir()
        self.trigger = self.shared / TRIGGER_NAME
        self.claim = self.shared / CLAIM_NAME
        self.stub_log = root / "deploys.jsonl"
        self.gate = root / "gate"
        self.stub, deploy_command = write_stub(root)
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("DEPLOY_")}
        self.env.update(
            DEPLOY_WATCH_DIR=str(self.shared),
            DEPLOY_COMMAND=deploy_command,
            STUB_LOG=str(self.stub_log),
        )
        self.watchers = []

    def environment(self, gated=False, **extra):
        env = dict(self.env, **extra)
        if gated:
            env["STUB_GATE"] = str(self.gate)
        return env

    def start(self, *args, gated=False, env=None, **popen):
        """Start a watcher and wait until it watches."""
        log_path = self.root / f"watcher-{len(self.watchers)}.log"
        watcher = Watcher(args, self.environment(gated, **(env or {})), log_path, **popen)
        self.watchers.append(watcher)
        watcher.wait_for_log("watching ")
        return watcher

    def run(self, *args, env=None):
        return subprocess.run(
            [sys.executable, str(WATCHER), *args],
            env=self.environment(**(env or {})),
            capture_output=True,
            text=True,
            timeout=WAIT_SECONDS,
        )

    def starts(self):
        return read_records(self.stub_log, "start")

    def ends(self):
        return read_records(self.stub_log, "end")

    def deliveries(self):
        return [start["env"].get("DEPLOY_DELIVERY") for start in self.starts()]

    def write_trigger(self, delivery=None, content=None):
        """Write the trigger as the view does: a dotted temp file, then a rename."""
        temp = self.shared / ".deploy_trigger.txt.tmp"
        temp.write_text(trigger_json(delivery) if content is None else content)
        os.replace(temp, self.trigger)

    def write_trigger_in_place(self, content="deploy"):
        """Write the trigger as the procedure's view does: open, write, close."""
        with open(self.trigger, "w") as trigger:
            trigger.write(content)

    def deliveries_before_marker(self):
        """Write a marker trigger, wait for its deploy: the deliveries before it."""
        # Written over a trigger not yet claimed, the marker would stand for both.
        wait_until(lambda: not os.path.lexists(self.trigger), "the trigger claimed")
        self.write_trigger("marker")
        wait_until(
            lambda: "marker" in [e.get("DEPLOY_DELIVERY") for e in self.ended_envs()],
            "the marker's deploy",
        )
        wait_until(lambda: not os.path.lexists(self.claim), "the marker's claim dropped")
        deliveries = self.deliveries()
        assert deliveries[-1] == "marker" and deliveries.count("marker") == 1, deliveries
        return deliveries[:-1]

    def ended_envs(self):
        # An end record follows its start: pair them by process.
        ended = {end["pid"] for end in self.ends()}
        return [start["env"] for start in self.starts() if start["pid"] in ended]

    def wait_for_deploys(self, count):
        wait_until(lambda: len(self.starts()) >= count, f"{count} deploy(s) to start")

    def cleanup(self):
        self.gate.touch()
        for watcher in self.watchers:
            if watcher.proc.poll() is None:
                watcher.proc.kill()
                watcher.proc.wait()
        for start in self.starts():
            try:
                os.killpg(start["sid"], signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.fixture
def box(tmp_path):
    box = Box(tmp_path)
    yield box
    box.cleanup()


def error_line(stderr):
    """The single line of stderr, without its timestamp."""
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    return lines[0].split(" ", 2)[2]


# One write, one deploy.


def test_one_write_in_place_deploys_once(box):
    box.start()
    box.write_trigger_in_place("deploy")
    assert box.deliveries_before_marker() == [None]


def test_one_write_by_rename_deploys_once(box):
    box.start()
    box.write_trigger("push-1")
    assert box.deliveries_before_marker() == ["push-1"]


def test_burst_during_a_deploy_gives_exactly_one_more_deploy(box):
    box.start(gated=True)
    box.write_trigger("first")
    box.wait_for_deploys(1)
    for number in range(10):
        if number % 2:
            box.write_trigger(f"burst-{number}")
        else:
            box.write_trigger_in_place(trigger_json(f"burst-{number}"))
    box.gate.touch()
    assert box.deliveries_before_marker() == ["first", "burst-9"]


def test_trigger_pending_at_start_is_deployed_once(box):
    box.write_trigger("pending")
    box.start()
    assert box.deliveries_before_marker() == ["pending"]


def test_deploy_cut_short_by_sigkill_runs_again_at_restart(box):
    watcher = box.start(gated=True)
    box.write_trigger("interrupted")
    box.wait_for_deploys(1)
    watcher.proc.kill()
    watcher.wait()
    # A power cut takes the deploy down with the watcher.
    os.killpg(box.starts()[0]["sid"], signal.SIGKILL)
    assert box.claim.exists() and not box.trigger.exists()
    box.start()
    # A trigger written now would be renamed over the claim: one deploy for both.
    box.wait_for_deploys(2)
    assert box.deliveries_before_marker() == ["interrupted", "interrupted"]
    assert not box.claim.exists()


def test_leftover_claim_and_newer_trigger_give_one_deploy(box):
    box.claim.write_text(trigger_json("interrupted"))
    box.write_trigger("newer")
    box.start()
    assert box.deliveries_before_marker() == ["newer"]


# Untrusted content.


def test_symlink_trigger_deploys_without_reading_its_target(box):
    target = box.root / "outside.json"
    target.write_text(trigger_json("read-through-the-link"))
    before = target.stat()
    box.start()
    link = box.shared / ".link"
    link.symlink_to(target)
    os.replace(link, box.trigger)
    assert box.deliveries_before_marker() == [None]
    assert target.read_text() == trigger_json("read-through-the-link")
    after = target.stat()
    assert (after.st_mode, after.st_mtime_ns, after.st_nlink) == (
        before.st_mode,
        before.st_mtime_ns,
        before.st_nlink,
    )
    assert not os.path.lexists(box.trigger) and not os.path.lexists(box.claim)


def test_fifo_trigger_is_removed_without_hanging_or_deploying(box):
    watcher = box.start()
    fifo = box.shared / ".fifo"
    os.mkfifo(fifo)
    os.replace(fifo, box.trigger)
    assert box.deliveries_before_marker() == []
    assert "warning: ignored deploy_trigger.txt: it is a fifo, not a file" in watcher.log()
    assert not os.path.lexists(box.claim)


def test_directory_trigger_is_moved_aside_whole_without_deploying(box):
    watcher = box.start()
    folder = box.shared / ".folder"
    (folder / "inner").mkdir(parents=True)
    (folder / "inner" / "file").write_text("x")
    os.replace(folder, box.trigger)
    assert box.deliveries_before_marker() == []
    assert "it is a directory, not a file" in watcher.log()
    assert not os.path.lexists(box.claim) and not os.path.lexists(box.trigger)
    [aside] = box.shared.glob(f".{TRIGGER_NAME}.not-a-file.*")
    assert (aside / "inner" / "file").read_text() == "x"


def run_once_with(box, content, **env):
    """Deploy one pending trigger with --once; the deploy's DEPLOY_* environment."""
    trigger = box.shared / TRIGGER_NAME
    trigger.write_bytes(content if isinstance(content, bytes) else content.encode())
    result = box.run("--once", env=env)
    assert result.returncode == 0, result.stderr
    (start,) = box.starts()
    return start["env"]


def test_well_formed_fields_are_passed_to_the_deploy(box):
    env = run_once_with(box, trigger_json("72d3162e-cc78-11e3-81ab-4c9367dc0958"))
    assert env["DEPLOY_SHA"] == SHA
    assert env["DEPLOY_REF"] == "refs/heads/main"
    assert env["DEPLOY_DELIVERY"] == "72d3162e-cc78-11e3-81ab-4c9367dc0958"


def test_sha256_commit_is_passed(box):
    content = json.dumps({"after": "ab" * 32})
    assert run_once_with(box, content)["DEPLOY_SHA"] == "ab" * 32


def test_trigger_of_exactly_4096_bytes_is_read(box):
    content = trigger_json("edge")
    content = content[:-2] + ',"pad":"' + "x" * (4096 - len(content) - 9) + '"}\n'
    assert len(content.encode()) == 4096
    assert run_once_with(box, content)["DEPLOY_DELIVERY"] == "edge"


@pytest.mark.parametrize(
    "content",
    [
        pytest.param("deploy", id="procedure-plain-word"),
        pytest.param("", id="empty"),
        pytest.param(b"\xff\xfe{garbage", id="not-utf8"),
        pytest.param("[1, 2]", id="json-list"),
        pytest.param("[" * 4000, id="nested-too-deep"),
        pytest.param(
            json.dumps({"after": 1, "ref": ["refs/heads/main"], "delivery": None}), id="wrong-types"
        ),
        pytest.param(
            trigger_json("oversize")[:-2] + ',"pad":"' + "x" * 5000 + '"}\n', id="over-4096-bytes"
        ),
        pytest.param(
            json.dumps({"after": "$(rm -rf /)", "ref": "../../etc", "delivery": "x; rm -rf /"}),
            id="shell-and-path-injection",
        ),
        pytest.param(
            json.dumps({"after": SHA.upper(), "ref": "refs/heads/main\n", "delivery": "a" * 101}),
            id="uppercase-sha-newline-ref-long-delivery",
        ),
        pytest.param(
            json.dumps({"after": SHA[:-1], "ref": "refs/heads/ma in", "delivery": "../../etc"}),
            id="short-sha-space-ref-dotted-delivery",
        ),
    ],
)
def test_malformed_content_deploys_without_fields(box, content):
    env = run_once_with(box, content)
    assert not {"DEPLOY_SHA", "DEPLOY_REF", "DEPLOY_DELIVERY"} & set(env)


def test_stale_fields_in_the_watchers_environment_are_not_passed(box):
    env = run_once_with(box, "deploy", DEPLOY_SHA="f" * 40, DEPLOY_DELIVERY="stale")
    assert "DEPLOY_SHA" not in env and "DEPLOY_DELIVERY" not in env


def test_watchers_environment_is_passed_to_the_deploy(box):
    env = run_once_with(box, "deploy", DEPLOY_APP_DIR="/srv/app", DEPLOY_BRANCH="release")
    assert env["DEPLOY_APP_DIR"] == "/srv/app" and env["DEPLOY_BRANCH"] == "release"
    assert "DEPLOY_DRY_RUN" not in env


def test_dry_run_sets_deploy_dry_run_for_the_deploy(box):
    box.write_trigger("dry")
    assert box.run("--once", "--dry-run").returncode == 0
    assert box.starts()[0]["env"]["DEPLOY_DRY_RUN"] == "1"


def test_other_file_names_are_ignored(box):
    box.start()
    for name in (
        ".deploy_trigger.txt.tmp",
        "other.txt",
        "deploy_trigger.txt.bak",
        "DEPLOY_TRIGGER.TXT",
    ):
        (box.shared / name).write_text(trigger_json("wrong-name"))
    assert box.deliveries_before_marker() == []


def test_flag_overrides_the_environment(box):
    (box.shared / "from-env.json").write_text(trigger_json("env"))
    (box.shared / "from-flag.json").write_text(trigger_json("flag"))
    result = box.run(
        "--once", "--trigger-name", "from-flag.json", env={"DEPLOY_TRIGGER_NAME": "from-env.json"}
    )
    assert result.returncode == 0, result.stderr
    assert box.deliveries() == ["flag"]
    assert (box.shared / "from-env.json").exists()


# Logging.


def test_deploy_output_and_outcome_are_logged(box):
    watcher = box.start()
    box.write_trigger("logged")
    box.deliveries_before_marker()
    log = watcher.log()
    for line in (
        f"trigger seen: commit {SHA[:12]} on refs/heads/main (delivery logged)",
        "deploy started: ",
        "  | stub output line",
        "  | stub error line",
        "deploy succeeded in ",
    ):
        assert line in log
    assert log.count("  | stub output line") == 2


def test_output_line_written_in_pieces_is_logged_as_one_line(box):
    command = 'sh -c \'printf "part one"; sleep 0.2; printf " and two"\''
    watcher = box.start(env={"DEPLOY_COMMAND": command})
    box.write_trigger("pieces")
    watcher.wait_for_log("deploy succeeded in ")
    assert "  | part one and two\n" in watcher.log()


def test_process_left_behind_by_a_deploy_does_not_hold_up_the_watcher(box):
    pid_file = box.root / "left-behind.pid"
    command = f"sh -c 'sleep 60 & echo $! > {pid_file}; echo spawned'"
    watcher = box.start(env={"DEPLOY_COMMAND": command})
    try:
        box.write_trigger("leaves-a-process")
        # The process still holds the deploy's output open: the deploy's end counts.
        watcher.wait_for_log("deploy succeeded in ")
        assert "  | spawned" in watcher.log()
        wait_until(lambda: not box.claim.exists(), "the claim dropped")
    finally:
        wait_until(pid_file.exists, "the pid file")
        os.kill(int(pid_file.read_text()), signal.SIGKILL)


def test_log_file_is_appended(box):
    log_file = box.root / "watcher.log"
    log_file.write_text("earlier line\n")
    box.write_trigger("to-file")
    assert box.run("--once", "--log-file", str(log_file)).returncode == 0
    lines = log_file.read_text().splitlines()
    assert lines[0] == "earlier line"
    assert any(line.endswith("  | stub output line") for line in lines)
    assert any("deploy succeeded in " in line for line in lines)


# Failures.


def test_failed_deploy_is_logged_and_the_next_trigger_deploys(box):
    watcher = box.start()
    box.write_trigger("fail-1")
    box.wait_for_deploys(1)
    box.write_trigger("good")
    assert box.deliveries_before_marker() == ["fail-1", "good"]
    assert [end["status"] for end in box.ends()] == [1, 0, 0]
    assert "error: deploy failed in " in watcher.log() and ": exit status 1" in watcher.log()


@pytest.mark.parametrize("problem", ["missing", "not-executable"])
def test_deploy_command_that_cannot_start_is_logged_and_watching_goes_on(box, problem):
    command = box.root / "deploy-command"
    if problem == "not-executable":
        command.write_text("#!/bin/sh\n")
    watcher = box.start(env={"DEPLOY_COMMAND": str(command)})
    watcher.wait_for_log(f"warning: the deploy command {command} is not found or not executable")
    reason = "No such file or directory" if problem == "missing" else "Permission denied"
    message = f"error: cannot run the deploy command {command}: {reason}"
    for attempt in (1, 2):
        box.write_trigger(f"attempt-{attempt}")
        wait_until(lambda: watcher.log().count(message) == attempt, f"attempt {attempt} logged")
        wait_until(lambda: not box.claim.exists(), "the claim dropped")
    assert watcher.proc.poll() is None


def test_missing_folder_at_start_is_a_one_line_error(box):
    missing = box.root / "missing"
    result = box.run("--watch-dir", str(missing))
    assert result.returncode == 2
    assert error_line(result.stderr) == f"error: the watch folder {missing} does not exist"


def test_no_watch_folder_is_a_one_line_error(box):
    env = {k: v for k, v in box.env.items() if k != "DEPLOY_WATCH_DIR"}
    result = subprocess.run(
        [sys.executable, str(WATCHER)],
        env=env,
        capture_output=True,
        text=True,
        timeout=WAIT_SECONDS,
    )
    assert result.returncode == 2
    assert (
        error_line(result.stderr)
        == "error: no watch folder: pass --watch-dir or set DEPLOY_WATCH_DIR"
    )


@pytest.mark.parametrize("name", ["sub/deploy_trigger.txt", "../deploy_trigger.txt", ".", "..", ""])
def test_trigger_name_that_is_not_a_plain_file_name_is_refused(box, name):
    result = box.run("--trigger-name", name)
    assert result.returncode == 2
    assert error_line(result.stderr) == (
        f"error: --trigger-name/DEPLOY_TRIGGER_NAME must be a plain file name, not {name!r}"
    )


def test_trigger_name_with_a_slash_from_the_environment_is_refused(box):
    result = box.run(env={"DEPLOY_TRIGGER_NAME": "/etc/passwd"})
    assert result.returncode == 2
    assert "must be a plain file name, not '/etc/passwd'" in error_line(result.stderr)


@pytest.mark.parametrize("value", ["0", "-1", "abc", "nan", "3601"])
def test_bad_poll_interval_is_refused(box, value):
    result = box.run("--poll", value)
    assert result.returncode == 2
    assert error_line(result.stderr).startswith(
        "error: --poll/DEPLOY_POLL must be a number of seconds"
    )


def shadow_inotify_simple(box):
    """A PYTHONPATH where `import inotify_simple` fails, as if it were not installed."""
    shadow = box.root / "shadow"
    shadow.mkdir()
    (shadow / "inotify_simple.py").write_text(
        "raise ImportError('No module named inotify_simple')\n"
    )
    return {"PYTHONPATH": str(shadow)}


def test_missing_inotify_simple_names_the_install_command(box):
    box.write_trigger("pending")
    result = box.run(env=shadow_inotify_simple(box))
    assert result.returncode == 2
    assert error_line(result.stderr) == (
        f"error: inotify_simple is not installed: run `{sys.executable} -m pip install "
        "inotify_simple` (or use --poll SECONDS)"
    )
    assert box.trigger.exists() and box.starts() == []


def test_poll_mode_runs_without_inotify_simple(box):
    box.start("--poll", "0.05", env=shadow_inotify_simple(box))
    box.write_trigger("polled")
    assert box.deliveries_before_marker() == ["polled"]


# Single instance.


def test_second_watcher_on_the_same_folder_is_refused(box):
    box.start()
    other_path = box.root / "same-folder-by-another-path"
    other_path.symlink_to(box.shared)
    result = box.run("--watch-dir", str(other_path))
    assert result.returncode == 4
    assert error_line(result.stderr) == f"error: another watcher is already running on {other_path}"


def test_once_is_refused_while_a_watcher_runs(box):
    box.start()
    result = box.run("--once")
    assert result.returncode == 4
    assert error_line(result.stderr).startswith("error: another watcher is already running on ")


# Signals.


def test_sigterm_while_idle_exits_0_at_once(box):
    watcher = box.start()
    watcher.proc.send_signal(signal.SIGTERM)
    assert watcher.proc.wait(timeout=2) == 0
    assert "SIGTERM received: stopping" in watcher.log()


def test_sigterm_while_idle_in_poll_mode_exits_0_at_once(box):
    watcher = box.start("--poll", "600")
    watcher.proc.send_signal(signal.SIGTERM)
    assert watcher.proc.wait(timeout=2) == 0


def test_sigterm_during_a_deploy_waits_for_it_then_exits_0(box):
    watcher = box.start(gated=True)
    box.write_trigger("running")
    box.wait_for_deploys(1)
    watcher.proc.send_signal(signal.SIGTERM)
    watcher.wait_for_log("SIGTERM received: waiting for the running deploy to finish")
    assert watcher.proc.poll() is None
    box.gate.touch()
    assert watcher.wait() == 0
    assert [end["status"] for end in box.ends()] == [0]


def test_ctrl_c_to_the_watchers_process_group_does_not_reach_the_deploy(box):
    watcher = box.start(gated=True, start_new_session=True)
    box.write_trigger("running")
    box.wait_for_deploys(1)
    os.killpg(watcher.proc.pid, signal.SIGINT)
    watcher.wait_for_log("SIGINT received: waiting for the running deploy to finish")
    box.gate.touch()
    assert watcher.wait() == 0
    assert [end["status"] for end in box.ends()] == [0]


def test_trigger_during_a_stopping_deploy_is_kept_for_the_next_start(box):
    watcher = box.start(gated=True)
    box.write_trigger("running")
    box.wait_for_deploys(1)
    watcher.proc.send_signal(signal.SIGTERM)
    watcher.wait_for_log("waiting for the running deploy to finish")
    box.write_trigger("arrived-while-stopping")
    box.gate.touch()
    assert watcher.wait() == 0
    assert box.trigger.exists()
    box.start()
    assert box.deliveries_before_marker() == ["running", "arrived-while-stopping"]


# The folder going away.


def test_folder_removed_while_watching_exits_non_zero(box):
    watcher = box.start()
    shutil.rmtree(box.shared)
    assert watcher.wait() == 1
    assert f"error: the watch folder {box.shared} was deleted: stopping" in watcher.log()


def test_folder_moved_while_watching_exits_non_zero(box):
    watcher = box.start()
    box.shared.rename(box.root / "moved")
    assert watcher.wait() == 1
    assert f"error: the watch folder {box.shared} was moved away: stopping" in watcher.log()


def test_folder_replaced_while_watching_exits_non_zero(box):
    watcher = box.start()
    replacement = box.root / "replacement"
    replacement.mkdir()
    replacement.rename(box.shared)
    assert watcher.wait() == 1
    assert f"error: the watch folder {box.shared} was replaced: stopping" in watcher.log()


def test_folder_removed_in_poll_mode_exits_non_zero(box):
    watcher = box.start("--poll", "0.05")
    shutil.rmtree(box.shared)
    assert watcher.wait() == 1
    assert f"error: the watch folder {box.shared} was deleted" in watcher.log()


def test_queue_overflow_rescans_the_folder(box):
    with open("/proc/sys/fs/inotify/max_queued_events") as limit:
        queue_size = int(limit.read())
    require(queue_size <= 100_000, "the inotify queue is too long to overflow quickly")
    watcher = box.start()
    # Stopped, the watcher reads nothing: the queue overflows and the
    # trigger's own event is dropped; only a rescan can find it.
    watcher.proc.send_signal(signal.SIGSTOP)
    flags = os.O_WRONLY | os.O_CREAT
    for number in range(queue_size + 10):
        os.close(os.open(box.shared / f"other-{number}", flags))
    box.write_trigger("after-overflow")
    watcher.proc.send_signal(signal.SIGCONT)
    assert box.deliveries_before_marker() == ["after-overflow"]
    assert "warning: the inotify queue overflowed: scanning the folder" in watcher.log()


# --once and --poll.


def test_once_deploys_a_pending_trigger_and_exits(box):
    box.write_trigger("pending")
    result = box.run("--once")
    assert result.returncode == 0, result.stderr
    assert box.deliveries() == ["pending"] and len(box.ends()) == 1
    assert not box.trigger.exists() and not box.claim.exists()


def test_once_without_a_trigger_exits_0_without_deploying(box):
    result = box.run("--once")
    assert result.returncode == 0, result.stderr
    assert box.starts() == []
    assert "no trigger pending: nothing to deploy" in result.stderr


def test_once_exits_with_the_deploys_status(box):
    box.write_trigger("fail-3")
    assert box.run("--once").returncode == 3


def test_poll_mode_deploys_a_trigger_once(box):
    box.start("--poll", "0.05")
    box.write_trigger("polled")
    assert box.deliveries_before_marker() == ["polled"]


def run_with_the_default_deploy(box, *args, **env):
    """Run the watcher with its own default deploy command (deploy.py beside it)."""
    environment = dict(box.env, **env)
    del environment["DEPLOY_COMMAND"]
    return subprocess.run(
        [sys.executable, str(WATCHER), *args],
        env=environment, capture_output=True, text=True, timeout=WAIT_SECONDS,
    )


def test_missing_app_dir_is_warned_at_start_for_the_default_deploy(box, tmp_path):
    result = run_with_the_default_deploy(box, "--once", DEPLOY_APP_DIR=str(tmp_path / "nowhere"))
    assert result.returncode == 0
    assert (
        f"warning: DEPLOY_APP_DIR {tmp_path / 'nowhere'} is not a folder:"
        " every deploy will fail until it is"
    ) in result.stderr


def test_check_passes_for_good_settings_and_deploys_nothing(box):
    box.write_trigger("pending")
    result = box.run("--check", "--poll", "1")
    assert result.returncode == 0, result.stderr
    assert "settings ok: watching" in result.stderr
    assert box.starts() == [] and box.trigger.exists()


def test_check_fails_while_another_watcher_runs(box):
    box.start()
    result = box.run("--check")
    assert result.returncode == 4
    assert f"error: another watcher is already running on {box.shared}" in result.stderr


def test_check_fails_on_a_bad_poll_value(box):
    result = box.run("--check", env={"DEPLOY_POLL": "abc"})
    assert result.returncode == 2
    assert "--poll/DEPLOY_POLL must be a number of seconds" in result.stderr


def test_check_fails_for_a_missing_app_dir(box, tmp_path):
    result = run_with_the_default_deploy(
        box, "--check", "--poll", "1", DEPLOY_APP_DIR=str(tmp_path / "nowhere")
    )
    assert result.returncode == 2
    assert f"error: DEPLOY_APP_DIR {tmp_path / 'nowhere'} is not a folder" in result.stderr


def test_check_runs_the_deploys_own_check_for_the_default_deploy(box, tmp_path):
    app = tmp_path / "app"
    (app / ".git").mkdir(parents=True)
    (app / "compose.yaml").write_text("services: {}\n")
    result = run_with_the_default_deploy(
        box, "--check", "--poll", "1", DEPLOY_APP_DIR=str(app), DEPLOY_BUILD="alwyas"
    )
    assert result.returncode == 2
    assert "error: DEPLOY_BUILD: unknown build mode 'alwyas'" in result.stderr
