"""deploy.py, run as a program against real git.

Each test gets a bare origin, the host's clone (the app dir) and a
developer's clone that pushes between runs, all in a temp folder, and a fake
`docker` / `docker-compose` first on PATH (tests/fake_docker_for_deploy.py)
that logs every call and fails or waits when told to.
"""

import contextlib
import http.server
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import deploy
import fake_docker_for_deploy as fake_docker
from conftest import GIT_IDENTITY, ROOT, git, require, run_script

INITIAL_FILES = {
    "docker-compose.yml": "services:\n  web:\n    build: web\n",
    "web/Dockerfile": "FROM scratch\n",
    "app.txt": "v1\n",
    ".gitignore": ".env\n",
}
WAIT = 30  # seconds a test waits for a background deploy to reach a point
# Seconds a run may take when something it started leaves a `sleep 30` behind:
# far below 30, far above a run's usual second (a hang check, not a timing).
HANG_BOUND = 15
# Lets git clone a submodule from a local path, for the tests only.
SUBMODULE_ENV = {
    "GIT_CONFIG_COUNT": "1",
    "GIT_CONFIG_KEY_0": "protocol.file.allow",
    "GIT_CONFIG_VALUE_0": "always",
}


class Host:
    """The host's checkout of an app, its origin, a developer's clone, a fake docker."""

    def __init__(self, root, files=INITIAL_FILES):
        self._place(root)
        self.home.mkdir()
        git("init", "--bare", "-q", "-b", "main", str(self.origin), cwd=root)
        git("clone", "-q", str(self.origin), str(self.dev), cwd=root)
        self.first = self.push(files, "first")
        git("clone", "-q", str(self.origin), str(self.app), cwd=root)
        fake_docker.install(self.bin)

    def _place(self, root):
        self.root = root
        self.origin = root / "origin.git"
        self.dev = root / "dev"
        self.app = root / "app"
        self.bin = root / "bin"
        self.home = root / "home"
        self.docker_log = root / "docker.log"

    def copy_to(self, root):
        """A copy of this host in `root` (cheaper than making one)."""
        shutil.copytree(self.root, root, symlinks=True, dirs_exist_ok=True)
        copy = Host.__new__(Host)
        copy._place(root)
        copy.first = self.first
        for clone in (copy.dev, copy.app):
            git("remote", "set-url", "origin", str(copy.origin), cwd=clone)
        return copy

    def push(self, files, message, force=False):
        """Commit `files` (None deletes one) in the developer's clone, push, return the commit."""
        for name, text in files.items():
            path = self.dev / name
            if text is None:
                path.unlink()
            else:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(text)
        git("add", "-A", cwd=self.dev)
        git("commit", "-q", "-m", message, cwd=self.dev)
        git("push", "-q", *(["--force"] if force else []), "origin", "HEAD:main", cwd=self.dev)
        return self.dev_head()

    def dev_head(self):
        return git("rev-parse", "HEAD", cwd=self.dev)

    def head(self):
        return git("rev-parse", "HEAD", cwd=self.app)

    def env(self, **extra):
        env = {
            key: value
            for key, value in os.environ.items()
            if not key.startswith(("DEPLOY_", "GIT_", "FAKE_DOCKER"))
        }
        env.update(GIT_IDENTITY)
        env.update(
            PATH=f"{self.bin}{os.pathsep}{os.environ['PATH']}",
            HOME=str(self.home),
            FAKE_DOCKER_LOG=str(self.docker_log),
        )
        env.update(extra)
        return env

    def deploy(self, *args, **extra_env):
        """Run deploy.py on the app dir; extra keyword arguments go to its environment."""
        return run_script("deploy.py", "--app-dir", str(self.app), *args, env=self.env(**extra_env))

    def start(self, *args, stdout=subprocess.DEVNULL, **extra_env):
        """Start deploy.py in the background."""
        return subprocess.Popen(
            [sys.executable, str(ROOT / "deploy.py"), "--app-dir", str(self.app), *args],
            env=self.env(**extra_env),
            stdout=stdout,
            stderr=subprocess.STDOUT,
            text=True,
        )

    def calls(self):
        return fake_docker.calls(self.docker_log)

    def actions(self):
        """The build, up and prune calls, in order, as "build"/"up"/"prune" (probes left out)."""
        return [name for name, _ in self.actions_with_calls()]

    def actions_with_calls(self):
        found = []
        for call in self.calls():
            words = call["argv"][1:]
            if call["argv"][0] == "docker" and words[:1] == ["compose"]:
                words = words[1:]
            while words[:1] == ["-f"]:
                words = words[2:]
            if words[:1] in (["version"], ["config"]) or "--help" in words:
                continue
            found.append(("prune" if words[:2] == ["image", "prune"] else words[0], call))
        return found

    def calls_of(self, action):
        return [call for name, call in self.actions_with_calls() if name == action]

    def record(self):
        path = self.app / ".git" / "webhook-deploy" / "last-deployed.json"
        return json.loads(path.read_text()) if path.exists() else None

    def history(self):
        path = self.app / ".git" / "webhook-deploy" / "history.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    def forget_calls(self):
        if self.docker_log.exists():
            self.docker_log.unlink()


@pytest.fixture(scope="session")
def fresh_host(tmp_path_factory):
    return Host(tmp_path_factory.mktemp("fresh"))


@pytest.fixture(scope="session")
def deployed_host(tmp_path_factory):
    host = Host(tmp_path_factory.mktemp("deployed"))
    result = host.deploy()
    assert result.returncode == 0, result.stdout + result.stderr
    host.forget_calls()
    return host


@pytest.fixture
def host(fresh_host, tmp_path):
    """A host never deployed to."""
    return fresh_host.copy_to(tmp_path)


@pytest.fixture
def deployed(deployed_host, tmp_path):
    """A host whose first deploy succeeded; its docker calls forgotten."""
    return deployed_host.copy_to(tmp_path)


def wait_for(predicate, what, timeout=WAIT):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.05)


def error_line(result):
    """The single line deploy.py printed on stderr."""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: "), lines[0]
    return lines[0]


def assert_no_overlap(calls):
    spans = sorted((call["start"], call["end"]) for call in calls)
    for (_, end), (start, _) in zip(spans, spans[1:]):
        assert end is not None and end <= start, spans


def process_gone(pid):
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return True
    return "\nState:\tZ" in status


def kill_pid_in(path):
    """End the process whose pid a fake left in `path`, if it did."""
    if path.exists():
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(path.read_text()), signal.SIGKILL)


def force_push_accepted_on_the_host(host):
    """Rewrite origin/main from the first commit; on the host, `reset --keep` to it as told."""
    git("reset", "-q", "--hard", host.first, cwd=host.dev)
    rewritten = host.push({"app.txt": "rewritten\n"}, "rewritten history", force=True)
    git("fetch", "-q", "origin", cwd=host.app)
    git("reset", "-q", "--keep", "origin/main", cwd=host.app)
    return rewritten


class Library:
    """A repository the app has as its submodule `lib`, and a clone to commit to it."""

    def __init__(self, host):
        self.host = host
        self.origin = host.root / "lib.git"
        self.dev = host.root / "lib-dev"
        git("init", "--bare", "-q", "-b", "main", str(self.origin), cwd=host.root)
        git("clone", "-q", str(self.origin), str(self.dev), cwd=host.root)

    def use(self, text, files=None):
        """Commit lib.txt = `text` to the library; push the app with `lib` at it (and `files`)."""
        (self.dev / "lib.txt").write_text(text)
        git("add", "-A", cwd=self.dev)
        git("commit", "-q", "-m", text, cwd=self.dev)
        git("push", "-q", "origin", "HEAD:main", cwd=self.dev)
        commit = git("rev-parse", "HEAD", cwd=self.dev)
        lib = self.host.dev / "lib"
        if lib.exists():
            git("fetch", "-q", "origin", cwd=lib)
            git("checkout", "-q", commit, cwd=lib)
        else:
            add = ["submodule", "add", "-q", str(self.origin), "lib"]
            git(*add, cwd=self.host.dev, env=SUBMODULE_ENV)
        self.host.push(files or {}, f"lib at {text}")
        return commit

    def checked_out(self):
        return (self.host.app / "lib" / "lib.txt").read_text()


# --- what gets built and run -------------------------------------------------


def test_first_deploy_builds_and_records_the_tip(host):
    result = host.deploy()
    assert result.returncode == 0, result.stderr
    assert host.actions() == ["build", "up", "prune"]
    assert "rebuild: first deploy" in result.stdout
    assert host.calls_of("build")[0]["argv"][-2:] == ["build", "--pull"]
    record = host.record()
    assert record["commit"] == host.first
    assert {"fetch", "build", "up"} <= {step["step"] for step in record["steps"]}
    assert all(isinstance(step["seconds"], float) for step in record["steps"])
    assert host.history()[-1]["result"] == "deployed"


def test_first_deploy_rolls_back_to_what_was_checked_out(host):
    host.push({"app.txt": "v2\n", "FAIL_UP": ""}, "broken start")
    result = host.deploy()
    assert result.returncode == 1, result.stdout
    assert host.head() == host.first
    assert [call["app"] for call in host.calls_of("up")] == ["v2\n", "v1\n"]
    assert host.record() is None


def test_code_only_push_recreates_without_rebuilding(deployed):
    tip = deployed.push({"app.txt": "v2\n"}, "code")
    result = deployed.deploy()
    assert result.returncode == 0, result.stderr
    assert deployed.actions() == ["up", "prune"]
    assert deployed.calls_of("up")[0]["app"] == "v2\n"
    assert "no rebuild: no image inputs changed (--build auto)" in result.stdout
    assert deployed.head() == tip
    assert deployed.record()["commit"] == tip


def test_code_only_push_warns_when_the_image_copies_the_code(deployed):
    deployed.push({"web/Dockerfile": "FROM scratch\nCOPY --chown=app . /app\n"}, "image")
    assert deployed.deploy().returncode == 0
    deployed.forget_calls()
    deployed.push({"app.txt": "v3\n"}, "code")
    result = deployed.deploy()
    assert result.returncode == 0, result.stderr
    assert deployed.actions() == ["up", "prune"]
    assert (
        "warning: no rebuild, but web/Dockerfile copies the whole build context: the code"
        " changes reach the containers only with a rebuild (set DEPLOY_BUILD=always)"
    ) in result.stdout


def test_code_only_push_gives_no_copy_warning_for_a_bind_mounted_app(deployed):
    deployed.push({"app.txt": "v2\n"}, "code")
    result = deployed.deploy()
    assert "warning: no rebuild" not in result.stdout


def test_up_recreates_and_waits_with_the_wait_timeout(deployed):
    deployed.push({"app.txt": "v2\n"}, "code")
    assert deployed.deploy("--wait-timeout", "42").returncode == 0
    assert deployed.calls_of("up")[0]["argv"][2:] == [
        "up",
        "-d",
        "--force-recreate",
        "--remove-orphans",
        "--wait",
        "--wait-timeout",
        "42",
    ]


def test_three_commits_with_the_dockerfile_changed_in_the_first_rebuild(deployed):
    deployed.push({"web/Dockerfile": "FROM scratch\nCOPY . /\n"}, "image")
    deployed.push({"app.txt": "v2\n"}, "code")
    deployed.push({"app.txt": "v3\n"}, "more code")
    result = deployed.deploy()
    assert result.returncode == 0, result.stderr
    assert deployed.actions() == ["build", "up", "prune"]
    assert "rebuild: Dockerfile changed (web/Dockerfile)" in result.stdout


@pytest.mark.parametrize(
    "path",
    [
        "Dockerfile",
        "requirements.txt",
        "services/api/Dockerfile",
        "web/Dockerfile.prod",
        "api.Dockerfile",
        "services/api/requirements-prod.txt",
        "compose.override.yaml",
        "deploy/docker-compose.prod.yml",
        ".dockerignore",
    ],
)
def test_change_to_an_image_input_rebuilds(deployed, path):
    deployed.push({path: "changed\n"}, f"change {path}")
    result = deployed.deploy()
    assert result.returncode == 0, result.stderr
    assert deployed.actions() == ["build", "up", "prune"]
    assert f"({path})" in result.stdout


@pytest.mark.parametrize(
    "path, kind",
    [
        ("Dockerfile", "Dockerfile"),
        ("a/b/dockerfile", "Dockerfile"),
        ("web/Dockerfile.dev", "Dockerfile"),
        ("web/api.Dockerfile", "Dockerfile"),
        ("docker-compose.yaml", "compose file"),
        ("ops/compose.prod.yml", "compose file"),
        ("requirements.txt", "requirements"),
        ("api/requirements-dev.txt", "requirements"),
        ("web/.dockerignore", ".dockerignore"),
        ("web/Dockerfile.dockerignore", ".dockerignore"),
        ("README.md", None),
        ("src/dockerfile_utils.py", None),
        ("docs/compose-guide.md", None),
        ("requirements.in", None),
        ("app/requirements.txt.bak", None),
    ],
)
def test_image_input_kind(path, kind):
    assert deploy.image_input_kind(path) == kind


def test_build_always_rebuilds_for_a_code_change(deployed):
    deployed.push({"app.txt": "v2\n"}, "code")
    result = deployed.deploy("--build", "always")
    assert deployed.actions() == ["build", "up", "prune"]
    assert "rebuild: --build always" in result.stdout


def test_build_never_skips_the_build_for_a_dockerfile_change(deployed):
    deployed.push({"web/Dockerfile": "FROM scratch\nCOPY . /\n"}, "image")
    result = deployed.deploy(DEPLOY_BUILD="never")
    assert deployed.actions() == ["up", "prune"]
    assert "no rebuild: --build never" in result.stdout


def test_no_pull_builds_without_pull(deployed):
    deployed.push({"web/Dockerfile": "FROM scratch\nCOPY . /\n"}, "image")
    assert deployed.deploy("--no-pull").returncode == 0
    assert deployed.calls_of("build")[0]["argv"][2:] == ["build"]


def test_compose_file_option_is_passed_to_every_compose_call(tmp_path):
    host = Host(tmp_path, files=dict(INITIAL_FILES, **{"prod.yml": "services: {}\n"}))
    assert host.deploy("--compose-file", "prod.yml").returncode == 0
    commands = [call for _, call in host.actions_with_calls() if call["argv"][1:2] == ["compose"]]
    assert len(commands) == 2 and all(call["argv"][2:4] == ["-f", "prod.yml"] for call in commands)


def test_change_to_the_named_compose_file_rebuilds(tmp_path):
    host = Host(tmp_path, files=dict(INITIAL_FILES, **{"prod.yml": "services: {}\n"}))
    assert host.deploy(DEPLOY_COMPOSE_FILE="prod.yml").returncode == 0
    host.forget_calls()
    host.push({"prod.yml": "services:\n  web: {}\n"}, "compose")
    result = host.deploy(DEPLOY_COMPOSE_FILE="prod.yml")
    assert host.actions() == ["build", "up", "prune"]
    assert "rebuild: compose file changed (prod.yml)" in result.stdout


def test_change_to_the_named_compose_file_rebuilds_through_a_symlinked_app_dir(tmp_path):
    host = Host(tmp_path, files=dict(INITIAL_FILES, **{"prod.yml": "services: {}\n"}))
    site = tmp_path / "site"
    site.symlink_to(host.app)
    args = ["--app-dir", str(site), "--compose-file", "prod.yml"]
    assert run_script("deploy.py", *args, env=host.env()).returncode == 0
    host.forget_calls()
    host.push({"prod.yml": "services:\n  web: {}\n"}, "compose")
    result = run_script("deploy.py", *args, env=host.env())
    assert result.returncode == 0, result.stderr
    assert host.actions() == ["build", "up", "prune"]
    assert "rebuild: compose file changed (prod.yml)" in result.stdout


def test_image_input_changed_since_a_rollback_by_hand_rebuilds(deployed):
    deployed.push({"web/Dockerfile": "FROM scratch\nCOPY . /\n"}, "image")
    assert deployed.deploy().returncode == 0
    git("reset", "-q", "--keep", "HEAD~1", cwd=deployed.app)
    deployed.push({"app.txt": "v2\n"}, "code")
    deployed.forget_calls()
    result = deployed.deploy()
    assert result.returncode == 0, result.stderr
    assert deployed.actions() == ["build", "up", "prune"]
    assert "rebuild: Dockerfile changed (web/Dockerfile)" in result.stdout


@pytest.mark.parametrize("where", ["environment", ".env"])
def test_compose_file_variable_stands_in_for_a_compose_file(tmp_path, where):
    host = Host(tmp_path, files={"prod.yml": "services: {}\n", "app.txt": "v1\n"})
    env = {}
    if where == "environment":
        env["COMPOSE_FILE"] = "prod.yml"
    else:
        (host.app / ".env").write_text("# compose reads this\nCOMPOSE_FILE=prod.yml\n")
    result = host.deploy(**env)
    assert result.returncode == 0, result.stderr
    assert host.actions() == ["build", "up", "prune"]


def test_last_deployed_commit_gone_from_the_repository_deploys_as_if_first(deployed):
    second = deployed.push({"app.txt": "v2\n"}, "code")
    assert deployed.deploy().returncode == 0
    force_push_accepted_on_the_host(deployed)
    git("reflog", "expire", "--expire=now", "--all", cwd=deployed.app)
    git("gc", "-q", "--prune=now", cwd=deployed.app)
    gone = subprocess.run(["git", "cat-file", "-e", second], cwd=deployed.app, capture_output=True)
    assert gone.returncode != 0
    tip = deployed.push({"app.txt": "v3\n"}, "code")
    deployed.forget_calls()
    result = deployed.deploy()
    assert result.returncode == 0, result.stdout + result.stderr
    assert (
        f"warning: the last deployed commit {second} is gone from the repository (history"
        " rewritten?): deploying as if for the first time" in result.stdout
    )
    assert "rebuild: first deploy" in result.stdout
    assert deployed.actions() == ["build", "up", "prune"]
    assert deployed.record()["commit"] == tip


def test_submodule_is_checked_out_at_the_deployed_commit(deployed):
    library = Library(deployed)
    library.use("lib v1\n")
    assert deployed.deploy(**SUBMODULE_ENV).returncode == 0
    assert library.checked_out() == "lib v1\n"
    library.use("lib v2\n")
    result = deployed.deploy(**SUBMODULE_ENV)
    assert result.returncode == 0, result.stderr
    assert library.checked_out() == "lib v2\n"


def test_stale_submodule_checkout_is_not_taken_for_a_host_edit(deployed):
    library = Library(deployed)
    old = library.use("lib v1\n")
    assert deployed.deploy(**SUBMODULE_ENV).returncode == 0
    library.use("lib v2\n")
    assert deployed.deploy(**SUBMODULE_ENV).returncode == 0
    git("checkout", "-q", old, cwd=deployed.app / "lib")
    library.use("lib v3\n")
    result = deployed.deploy(**SUBMODULE_ENV)
    assert result.returncode == 0, result.stderr
    assert library.checked_out() == "lib v3\n"


def test_rollback_puts_the_submodule_back(deployed):
    library = Library(deployed)
    library.use("lib v1\n")
    assert deployed.deploy(**SUBMODULE_ENV).returncode == 0
    library.use("lib v2\n", files={"FAIL_UP": ""})
    result = deployed.deploy(**SUBMODULE_ENV)
    assert result.returncode == 1, result.stderr
    assert "up failed, rolled back" in error_line(result)
    assert library.checked_out() == "lib v1\n"


def test_nothing_new_runs_no_docker_command(deployed):
    result = deployed.deploy()
    assert result.returncode == 0, result.stderr
    assert f"up to date at {deployed.first}" in result.stdout
    assert deployed.calls() == []


def test_force_recreates_the_deployed_commit(deployed):
    result = deployed.deploy("--force")
    assert result.returncode == 0, result.stderr
    assert deployed.actions() == ["up", "prune"]


def test_compose_v1_is_used_when_the_plugin_is_missing(deployed):
    deployed.push({"app.txt": "v2\n"}, "code")
    result = deployed.deploy(FAKE_DOCKER_FAIL="plugin")
    assert result.returncode == 0, result.stderr
    assert "compose: using `docker-compose`" in result.stdout
    up = deployed.calls_of("up")[0]["argv"]
    assert up == ["docker-compose", "up", "-d", "--force-recreate", "--remove-orphans"]
    # v1 labels no image with its project: the procedure's plain prune.
    assert deployed.calls_of("prune")[0]["argv"] == ["docker", "image", "prune", "-f"]


def test_compose_option_overrides_its_environment_variable(deployed):
    deployed.push({"app.txt": "v2\n"}, "code")
    result = deployed.deploy("--compose", "docker-compose", DEPLOY_COMPOSE="docker compose")
    assert result.returncode == 0, result.stderr
    assert deployed.calls_of("up")[0]["argv"][0] == "docker-compose"


def test_build_option_overrides_its_environment_variable(deployed):
    deployed.push({"app.txt": "v2\n"}, "code")
    assert deployed.deploy("--build", "always", DEPLOY_BUILD="never").returncode == 0
    assert deployed.actions() == ["build", "up", "prune"]


def test_environment_configures_a_run_without_options(deployed):
    deployed.push({"app.txt": "v2\n"}, "code")
    result = run_script(
        "deploy.py",
        env=deployed.env(DEPLOY_APP_DIR=str(deployed.app), DEPLOY_BUILD="always", DEPLOY_PULL="0"),
    )
    assert result.returncode == 0, result.stderr
    assert deployed.calls_of("build")[0]["argv"][2:] == ["build"]


# --- failures and rollback ---------------------------------------------------


def test_failing_build_leaves_the_containers_alone_and_restores_the_tree(deployed):
    deployed.push({"web/Dockerfile": "FROM nowhere\n", "app.txt": "v2\n"}, "bad image")
    result = deployed.deploy(FAKE_DOCKER_FAIL="build")
    assert result.returncode == 1
    assert "build failed" in error_line(result)
    assert deployed.actions() == ["build"]
    assert deployed.head() == deployed.first
    assert (deployed.app / "app.txt").read_text() == "v1\n"
    assert deployed.record()["commit"] == deployed.first
    assert deployed.history()[-1]["result"] == "failed"


def test_next_run_after_a_failed_build_deploys_with_a_healthy_builder(deployed):
    tip = deployed.push({"web/Dockerfile": "FROM scratch\nCOPY . /\n"}, "image")
    assert deployed.deploy(FAKE_DOCKER_FAIL="build").returncode == 1
    deployed.forget_calls()
    result = deployed.deploy()
    assert result.returncode == 0, result.stderr
    assert deployed.actions() == ["build", "up", "prune"]
    assert deployed.head() == tip


def test_failing_up_rolls_back_and_brings_the_old_commit_up(deployed):
    deployed.push({"app.txt": "v2\n", "FAIL_UP": ""}, "broken start")
    result = deployed.deploy()
    assert result.returncode == 1
    assert "up failed, rolled back" in error_line(result)
    assert deployed.actions() == ["up", "up"]
    assert [call["app"] for call in deployed.calls_of("up")] == ["v2\n", "v1\n"]
    assert deployed.head() == deployed.first
    assert deployed.record()["commit"] == deployed.first
    last = deployed.history()[-1]
    assert last["result"] == "failed" and "up failed" in last["reason"]


def test_failing_up_after_a_build_rebuilds_the_old_images(deployed):
    deployed.push({"web/Dockerfile": "FROM scratch\nCOPY . /\n", "FAIL_UP": ""}, "broken image")
    assert deployed.deploy().returncode == 1
    assert deployed.actions() == ["build", "up", "build", "up"]
    forward, back = deployed.calls_of("build")
    assert forward["argv"][2:] == ["build", "--pull"]
    assert back["argv"][2:] == ["build"]


def test_failing_rollback_says_the_site_may_be_down(deployed):
    deployed.push({"app.txt": "v2\n"}, "code")
    result = deployed.deploy(FAKE_DOCKER_FAIL="up")
    assert result.returncode == 5
    assert "ROLLBACK FAILED, THE SITE MAY BE DOWN" in error_line(result)
    assert deployed.history()[-1]["result"] == "rollback failed"


def test_prune_is_kept_to_the_apps_compose_project(deployed):
    deployed.push({"app.txt": "v2\n"}, "code")
    assert deployed.deploy().returncode == 0
    (prune,) = deployed.calls_of("prune")
    project = deployed.app.name.lower()
    assert prune["argv"] == [
        "docker", "image", "prune", "-f", "--filter", f"label=com.docker.compose.project={project}"
    ]


def test_prune_failure_is_only_a_warning(deployed):
    tip = deployed.push({"app.txt": "v2\n"}, "code")
    result = deployed.deploy(FAKE_DOCKER_FAIL="prune")
    assert result.returncode == 0, result.stderr
    assert "warning: image prune failed" in result.stdout
    assert deployed.record()["commit"] == tip


def test_failed_up_after_an_accepted_force_push_says_how_to_deploy_the_next_push(deployed):
    second = deployed.push({"app.txt": "v2\n"}, "code")
    assert deployed.deploy().returncode == 0
    force_push_accepted_on_the_host(deployed)
    deployed.push({"app.txt": "v3\n", "FAIL_UP": ""}, "broken start")
    result = deployed.deploy()
    assert result.returncode == 1, result.stdout
    assert (
        f"up failed, rolled back to {second[:12]} (not in the history of origin/main, which was"
        " force-pushed: the next deploy will refuse as force-pushed; to deploy the next push,"
        f" run `git -C {deployed.app} reset --keep origin/main` first): " in error_line(result)
    )
    assert deployed.head() == second


def test_stale_index_lock_names_the_file_to_remove(deployed):
    lock = deployed.app / ".git" / "index.lock"
    lock.touch()
    deployed.push({"app.txt": "v2\n"}, "code")
    result = deployed.deploy()
    assert result.returncode == 1
    assert error_line(result) == (
        f"error: git cannot lock the index: {lock} exists (left by a git that was killed?);"
        f" if no git process is running, remove {lock}, then deploy again"
    )
    assert deployed.head() == deployed.first


def test_git_killed_with_the_deploy_removes_its_index_lock(deployed):
    started, release = deployed.root / "filter-started", deployed.root / "filter-release"
    # A smudge filter that blocks holds git inside the checkout, index.lock taken.
    blocking = f"touch {started}; while [ ! -e {release} ]; do sleep 0.05; done; cat"
    git("config", "filter.blocking.smudge", blocking, cwd=deployed.app)
    (deployed.app / ".git" / "info" / "attributes").write_text("app.txt filter=blocking\n")
    deployed.push({"app.txt": "v2\n"}, "code")
    lock = deployed.app / ".git" / "index.lock"
    run = deployed.start()
    try:
        wait_for(started.exists, "git to check out app.txt")
        assert lock.exists()
        run.send_signal(signal.SIGKILL)
        run.wait(timeout=WAIT)
        wait_for(lambda: not lock.exists(), "the killed deploy's git to remove index.lock", 5)
    finally:
        release.touch()


def test_run_past_its_timeout_sends_sigterm_then_sigkill(tmp_path, monkeypatch):
    monkeypatch.setattr(deploy, "TERM_GRACE", 0.5)
    marker = tmp_path / "got-sigterm"
    child = (
        "import pathlib, signal, time\n"
        f"signal.signal(signal.SIGTERM, lambda *_: pathlib.Path({str(marker)!r}).touch())\n"
        "time.sleep(30)\n"
    )
    with pytest.raises(deploy.DeployError, match="timed out after 1 s"):
        deploy.run([sys.executable, "-c", child], cwd=tmp_path, timeout=1)
    assert marker.exists()


SLOW_SSH = """#!/bin/sh
echo $$ > "$FAKE_SSH_PID"
exec sleep 30
"""

# Serves the local origin as ssh would, and leaves behind a process that
# holds its stderr open, as ssh's ControlMaster/ControlPersist does.
MASTER_SSH = """#!/bin/sh
sleep 30 </dev/null >/dev/null &
echo $! > "$FAKE_SSH_PID"
for command; do :; done
exec sh -c "$command"
"""


def use_fake_ssh(host, script):
    ssh = host.bin / "ssh"
    ssh.write_text(script)
    ssh.chmod(0o755)
    git("remote", "set-url", "origin", f"ssh://git@example.invalid{host.origin}", cwd=host.app)
    return host.root / "ssh.pid"


def test_fetch_past_its_timeout_says_it_timed_out(deployed, monkeypatch):
    pid = use_fake_ssh(deployed, SLOW_SSH)
    monkeypatch.setattr(deploy, "FETCH_TIMEOUT", 1.0)
    checkout = deploy.Checkout(str(deployed.app), deployed.env(FAKE_SSH_PID=str(pid)))
    checkout.open()
    checkout.use_remote("origin")
    try:
        with pytest.raises(deploy.DeployError) as raised:
            checkout.fetch("origin", "main")
    finally:
        kill_pid_in(pid)
    assert str(raised.value) == "git fetch origin failed: timed out after 1 s"


def test_fetch_does_not_wait_for_a_process_ssh_left_on_its_output(deployed):
    pid = use_fake_ssh(deployed, MASTER_SSH)
    tip = deployed.push({"app.txt": "v2\n"}, "code")
    try:
        result = run_script(
            "deploy.py",
            "--app-dir",
            str(deployed.app),
            env=deployed.env(FAKE_SSH_PID=str(pid)),
            timeout=HANG_BOUND,
        )
    finally:
        kill_pid_in(pid)
    assert result.returncode == 0, result.stdout + result.stderr
    assert deployed.head() == tip


def test_up_does_not_wait_for_a_process_it_left_on_its_output(deployed):
    pid = deployed.root / "sleep.pid"
    try:
        result = run_script(
            "deploy.py",
            "--app-dir",
            str(deployed.app),
            "--force",
            env=deployed.env(FAKE_DOCKER_LINGER=str(pid)),
            timeout=HANG_BOUND,
        )
    finally:
        kill_pid_in(pid)
    assert result.returncode == 0, result.stdout + result.stderr
    assert deployed.actions() == ["up", "prune"]


def test_unreachable_remote_fails_and_changes_nothing(deployed):
    deployed.push({"app.txt": "v2\n"}, "code")
    git("remote", "set-url", "origin", str(deployed.root / "gone.git"), cwd=deployed.app)
    result = deployed.deploy()
    assert result.returncode == 1
    assert "git fetch origin failed" in error_line(result)
    assert deployed.head() == deployed.first
    assert deployed.calls() == []


# --- work on the host is never destroyed -------------------------------------


def test_host_edit_the_update_would_overwrite_is_kept_and_refused(deployed):
    (deployed.app / "app.txt").write_bytes(b"hot fix on the host\r\n")
    deployed.push({"app.txt": "v2\n"}, "code")
    result = deployed.deploy()
    assert result.returncode == 3
    line = error_line(result)
    assert "would overwrite tracked files edited on the host: app.txt" in line
    assert (deployed.app / "app.txt").read_bytes() == b"hot fix on the host\r\n"
    assert deployed.head() == deployed.first
    assert deployed.calls() == []


def test_staged_host_edit_the_update_would_overwrite_is_refused(deployed):
    (deployed.app / "app.txt").write_text("staged\n")
    git("add", "app.txt", cwd=deployed.app)
    (deployed.app / "app.txt").write_text("v1\n")
    deployed.push({"app.txt": "v2\n"}, "code")
    assert deployed.deploy().returncode == 3
    assert git("diff", "--cached", "--name-only", cwd=deployed.app) == "app.txt"


def test_host_edit_the_update_does_not_touch_is_kept(deployed):
    (deployed.app / "web" / "Dockerfile").write_text("FROM scratch\n# host tweak\n")
    tip = deployed.push({"app.txt": "v2\n"}, "code")
    result = deployed.deploy()
    assert result.returncode == 0, result.stderr
    assert (
        "warning: keeping local edits to tracked files the update does not touch: web/Dockerfile"
        in result.stdout
    )
    assert (deployed.app / "web" / "Dockerfile").read_text() == "FROM scratch\n# host tweak\n"
    assert deployed.head() == tip


def test_untracked_env_file_is_kept(deployed):
    (deployed.app / ".env").write_bytes(b"SECRET=on-the-host\n")
    (deployed.app / "notes.txt").write_bytes(b"untracked\n")
    deployed.push(
        {"web/Dockerfile": "FROM scratch\nCOPY . /\n", "app.txt": "v2\n"}, "image and code"
    )
    assert deployed.deploy().returncode == 0
    assert (deployed.app / ".env").read_bytes() == b"SECRET=on-the-host\n"
    assert (deployed.app / "notes.txt").read_bytes() == b"untracked\n"


def test_update_adding_a_file_the_host_has_untracked_is_refused(deployed):
    (deployed.app / ".env").write_bytes(b"SECRET=on-the-host\n")
    (deployed.dev / ".env").write_text("SECRET=committed-by-mistake\n")
    git("add", "-f", ".env", cwd=deployed.dev)
    git("commit", "-q", "-m", "add .env", cwd=deployed.dev)
    git("push", "-q", "origin", "main", cwd=deployed.dev)
    result = deployed.deploy()
    assert result.returncode == 3
    assert "adds files that exist untracked on the host: .env" in error_line(result)
    assert (deployed.app / ".env").read_bytes() == b"SECRET=on-the-host\n"
    assert deployed.head() == deployed.first
    assert deployed.calls() == []


def test_force_pushed_remote_is_refused(deployed):
    second = deployed.push({"app.txt": "v2\n"}, "code")
    assert deployed.deploy().returncode == 0
    deployed.forget_calls()
    git("reset", "-q", "--hard", deployed.first, cwd=deployed.dev)
    deployed.push({"app.txt": "rewritten\n"}, "rewritten history", force=True)
    result = deployed.deploy()
    assert result.returncode == 3
    assert "origin/main was force-pushed" in error_line(result)
    assert deployed.head() == second
    assert deployed.calls() == []


def test_refusal_hint_quotes_an_app_dir_with_spaces(deployed, tmp_path):
    spaced = deployed.copy_to(tmp_path / "my sites")
    spaced.push({"app.txt": "v2\n"}, "code")
    assert spaced.deploy().returncode == 0
    git("reset", "-q", "--hard", spaced.first, cwd=spaced.dev)
    spaced.push({"app.txt": "rewritten\n"}, "rewritten history", force=True)
    result = spaced.deploy()
    assert result.returncode == 3
    assert f"`git -C '{spaced.app}' reset --keep origin/main`" in error_line(result)


def test_remote_forced_back_to_an_older_commit_is_refused(deployed):
    second = deployed.push({"app.txt": "v2\n"}, "code")
    assert deployed.deploy().returncode == 0
    git("push", "-q", "--force", "origin", f"{deployed.first}:main", cwd=deployed.dev)
    result = deployed.deploy()
    assert result.returncode == 3
    assert "force-pushed" in error_line(result)
    assert deployed.head() == second


def test_local_commit_not_on_the_remote_is_refused(deployed):
    (deployed.app / "local.txt").write_text("made on the host\n")
    git("add", "local.txt", cwd=deployed.app)
    git("commit", "-q", "-m", "host commit", cwd=deployed.app)
    local = deployed.head()
    deployed.push({"app.txt": "v2\n"}, "code")
    result = deployed.deploy()
    assert result.returncode == 3
    assert "1 local commit(s) on main" in error_line(result)
    assert deployed.head() == local
    assert deployed.calls() == []


def test_other_branch_checked_out_is_refused(deployed):
    git("switch", "-q", "-c", "feature", cwd=deployed.app)
    deployed.push({"app.txt": "v2\n"}, "code")
    result = deployed.deploy()
    assert result.returncode == 3
    assert "branch 'feature' is checked out" in error_line(result)
    assert deployed.calls() == []


def test_detached_head_is_refused(deployed):
    git("switch", "-q", "--detach", cwd=deployed.app)
    deployed.push({"app.txt": "v2\n"}, "code")
    result = deployed.deploy()
    assert result.returncode == 3
    assert "HEAD is detached" in error_line(result)


@pytest.mark.parametrize("how", ["flag", "environment"])
def test_dry_run_changes_nothing(deployed, how):
    deployed.push({"web/Dockerfile": "FROM scratch\nCOPY . /\n"}, "image")
    state = deployed.app / ".git" / "webhook-deploy"
    before = {path.name: path.read_bytes() for path in state.iterdir()}
    if how == "flag":
        result = deployed.deploy("--dry-run")
    else:
        result = deployed.deploy(DEPLOY_DRY_RUN="1")
    assert result.returncode == 0, result.stderr
    assert "plan: rebuild: Dockerfile changed (web/Dockerfile)" in result.stdout
    assert "plan: run: git merge --ff-only" in result.stdout
    assert "dry run: nothing changed" in result.stdout
    assert deployed.head() == deployed.first
    assert deployed.calls() == []
    assert {path.name: path.read_bytes() for path in state.iterdir()} == before


def test_dry_run_of_a_first_deploy_writes_no_record(host):
    result = host.deploy("--dry-run")
    assert result.returncode == 0, result.stderr
    assert not (host.app / ".git" / "webhook-deploy").exists()
    assert host.calls() == []


# --- one deploy at a time ----------------------------------------------------


def test_two_runs_started_together_never_overlap_and_build_once(deployed):
    deployed.push({"web/Dockerfile": "FROM scratch\nCOPY . /\n"}, "image")
    runs = [
        deployed.start(stdout=subprocess.PIPE, FAKE_DOCKER_BUILD_SECONDS="0.5") for _ in range(2)
    ]
    outputs = [run.communicate(timeout=WAIT)[0] for run in runs]
    assert [run.returncode for run in runs] == [0, 0], outputs
    assert len(deployed.calls_of("build")) == 1
    assert_no_overlap(deployed.calls_of("build") + deployed.calls_of("up"))
    assert sum("up to date at" in output for output in outputs) == 1


def test_run_started_during_a_deploy_deploys_the_newer_push_after_it(deployed):
    release = deployed.root / "release"
    deployed.push({"web/Dockerfile": "FROM scratch\nCOPY . /\n", "app.txt": "v2\n"}, "image")
    first = deployed.start(FAKE_DOCKER_BUILD_UNTIL=str(release))
    try:
        wait_for(lambda: deployed.calls_of("build"), "the first build")
        newest = deployed.push({"app.txt": "v3\n"}, "code")
        second_log = deployed.root / "second.out"
        with open(second_log, "w") as out:
            second = deployed.start(stdout=out)
        wait_for(lambda: "waiting for it" in second_log.read_text(), "the second run to wait")
    finally:
        release.touch()
    assert first.wait(timeout=WAIT) == 0
    assert second.wait(timeout=WAIT) == 0, second_log.read_text()
    assert [call["app"] for call in deployed.calls_of("up")] == ["v2\n", "v3\n"]
    assert_no_overlap(deployed.calls_of("build") + deployed.calls_of("up"))
    assert deployed.head() == newest
    assert deployed.record()["commit"] == newest


def test_lock_held_by_another_deploy_times_out_naming_it(deployed):
    release = deployed.root / "release"
    deployed.push({"web/Dockerfile": "FROM scratch\nCOPY . /\n"}, "image")
    first = deployed.start(FAKE_DOCKER_BUILD_UNTIL=str(release))
    try:
        wait_for(lambda: deployed.calls_of("build"), "the first build")
        result = deployed.deploy("--lock-timeout", "0.5")
    finally:
        release.touch()
    assert result.returncode == 4
    assert f"another deploy is running (pid {first.pid} since " in error_line(result)
    assert first.wait(timeout=WAIT) == 0


def test_lock_file_option_moves_the_lock_and_names_the_holder_in_it(deployed):
    lock = deployed.root / "deploy.lock"
    default = deployed.app / ".git" / "webhook-deploy.lock"
    before = default.read_bytes()
    result = deployed.deploy("--force", "--lock-file", str(lock))
    assert result.returncode == 0, result.stderr
    assert lock.read_text().startswith("pid ")
    assert default.read_bytes() == before


def test_sigkill_during_a_slow_build_ends_the_docker_child_and_frees_the_lock(deployed):
    never = deployed.root / "never"
    tip = deployed.push({"web/Dockerfile": "FROM scratch\nCOPY . /\n"}, "image")
    run = deployed.start(FAKE_DOCKER_BUILD_UNTIL=str(never))
    try:
        wait_for(lambda: deployed.calls_of("build"), "the build")
        build_pid = deployed.calls_of("build")[0]["pid"]
        run.send_signal(signal.SIGKILL)
        run.wait(timeout=WAIT)
        wait_for(
            lambda: process_gone(build_pid), "the killed deploy's docker child to end", timeout=5
        )
    finally:
        never.touch()  # lets an orphaned fake docker end, should the test fail
    deployed.forget_calls()
    result = deployed.deploy("--lock-timeout", "0")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "rebuild: an earlier build did not finish" in result.stdout
    assert deployed.actions() == ["build", "up", "prune"]
    assert deployed.record()["commit"] == tip


def test_redeploy_killed_while_recreating_is_redone_by_the_next_run(deployed):
    never = deployed.root / "never"
    tip = deployed.push({"app.txt": "v2\n"}, "v2")
    assert deployed.deploy().returncode == 0
    run = deployed.start("--force", FAKE_DOCKER_UP_UNTIL=str(never))
    try:
        wait_for(lambda: deployed.calls_of("up")[1:], "the forced run's up")
        run.send_signal(signal.SIGKILL)
        run.wait(timeout=WAIT)
    finally:
        never.touch()
    deployed.forget_calls()
    result = deployed.deploy()
    assert result.returncode == 0, result.stdout + result.stderr
    assert "the last deploy was cut short while recreating the containers" in result.stdout
    assert deployed.actions() == ["up", "prune"]
    deployed.forget_calls()
    again = deployed.deploy()
    assert f"up to date at {tip}" in again.stdout
    assert deployed.calls() == []


# --- output ------------------------------------------------------------------


def test_child_output_is_streamed_as_it_comes(deployed):
    release = deployed.root / "release"
    deployed.push({"web/Dockerfile": "FROM scratch\nCOPY . /\n"}, "image")
    run = deployed.start(stdout=subprocess.PIPE, FAKE_DOCKER_BUILD_UNTIL=str(release))
    try:
        for line in run.stdout:
            if "| #1 building web" in line:
                break
        assert deployed.calls_of("build")[0]["end"] is None
    finally:
        release.touch()
    run.communicate(timeout=WAIT)
    assert run.returncode == 0


def test_run_kills_a_child_past_its_timeout(tmp_path):
    with pytest.raises(deploy.DeployError, match="timed out after 0.5 s"):
        deploy.run(
            [sys.executable, "-c", "import time; time.sleep(30)"],
            cwd=tmp_path,
            timeout=0.5,
            stream=True,
        )


def test_trigger_details_are_recorded(host):
    env = {
        "DEPLOY_SHA": host.first,
        "DEPLOY_REF": "refs/heads/main",
        "DEPLOY_DELIVERY": "72d3162e-cc78-11e3-81ab-4c9367dc0958",
    }
    assert host.deploy(**env).returncode == 0
    assert host.record()["trigger"] == {
        "sha": host.first,
        "ref": "refs/heads/main",
        "delivery": "72d3162e-cc78-11e3-81ab-4c9367dc0958",
    }
    status = host.deploy("--status")
    assert "delivery 72d3162e-cc78-11e3-81ab-4c9367dc0958" in status.stdout


def test_status_before_any_deploy_says_never_deployed(host):
    result = host.deploy("--status")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0] == "never deployed"
    assert "no runs recorded" in result.stdout
    assert host.calls() == []


def test_status_shows_the_last_deploy_and_the_recent_runs(deployed):
    deployed.push({"app.txt": "v2\n", "FAIL_UP": ""}, "broken start")
    assert deployed.deploy().returncode == 1
    result = deployed.deploy("--status")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"last deployed: {deployed.first} from origin/main at ")
    runs = [line for line in result.stdout.splitlines() if line.startswith("  20")]
    assert "deployed" in runs[0]
    assert "failed" in runs[1] and "up failed" in runs[1]


def test_status_prints_unexpected_values_in_the_record_and_history_as_they_are(deployed):
    state = deployed.app / ".git" / "webhook-deploy"
    record = {"commit": deployed.first, "steps": [{"step": "fetch"}, "odd"], "seconds": "long"}
    (state / "last-deployed.json").write_text(json.dumps(dict(record, trigger="odd")))
    (state / "history.jsonl").write_text(
        '[1, 2]\n{"time": 5, "result": null, "commit": 12345, "seconds": "slow",'
        ' "trigger": "x", "reason": ["a"]}\n'
    )
    result = deployed.deploy("--status")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        f"last deployed: {deployed.first} from None/None at None, without a build",
        "  took ?: fetch ?",
        f"checkout: main at {deployed.first}",
        "last 1 run(s), oldest first:",
        "  5  None  12345  ?  ['a']",
    ]


def test_status_prints_the_history_when_the_record_is_unreadable(deployed):
    path = deployed.app / ".git" / "webhook-deploy" / "last-deployed.json"
    path.write_text('{"commit": ')
    result = deployed.deploy("--status")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[:3] == [
        f"last deployed: unreadable: cannot read {path} (Expecting value: line 1 column 12"
        " (char 11)); move it away to deploy as if for the first time",
        f"checkout: main at {deployed.first}",
        "last 1 run(s), oldest first:",
    ]
    assert lines[3].split()[1:3] == ["deployed", deployed.first[:12]]


def test_history_entry_after_a_torn_last_line_starts_on_a_new_line(deployed):
    path = deployed.app / ".git" / "webhook-deploy" / "history.jsonl"
    with open(path, "a") as history:
        history.write('{"time": "2026-12-0')
    assert deployed.deploy("--force").returncode == 0
    lines = path.read_text().splitlines()
    assert lines[-2] == '{"time": "2026-12-0'
    assert json.loads(lines[-1])["result"] == "deployed"


def test_status_into_a_closed_pipe_ends_quietly(deployed):
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        result = subprocess.run(
            [sys.executable, str(ROOT / "deploy.py"), "--app-dir", str(deployed.app), "--status"],
            env=deployed.env(),
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            timeout=WAIT,
        )
    finally:
        os.close(write_end)
    assert (result.returncode, result.stderr) == (128 + signal.SIGPIPE, "")


# --- bad configuration: one line, exit 2, nothing changed -------------------


def assert_refused_as_configuration(host, result, expected):
    assert result.returncode == 2, result.stdout + result.stderr
    assert expected in error_line(result)
    assert host.head() == host.first
    assert host.calls() == []


def test_missing_app_dir_is_a_usage_error(host):
    result = run_script("deploy.py", env=host.env())
    assert_refused_as_configuration(host, result, "pass --app-dir DIR or set DEPLOY_APP_DIR")


def test_app_dir_that_does_not_exist_is_a_usage_error(host):
    result = run_script("deploy.py", "--app-dir", str(host.root / "nowhere"), env=host.env())
    assert_refused_as_configuration(host, result, "does not exist")


def test_app_dir_that_is_not_a_git_checkout_is_a_usage_error(host):
    plain = host.root / "plain"
    plain.mkdir()
    result = run_script("deploy.py", "--app-dir", str(plain), env=host.env())
    assert_refused_as_configuration(host, result, f"app dir {plain} is not a git checkout")


def test_checkout_without_a_compose_file_is_a_usage_error(tmp_path):
    host = Host(tmp_path, files={"app.txt": "v1\n"})
    result = host.deploy()
    assert_refused_as_configuration(host, result, f"no compose file in {host.app}")


def test_named_compose_file_that_does_not_exist_is_a_usage_error(deployed):
    result = deployed.deploy("--compose-file", "prod.yml")
    assert_refused_as_configuration(deployed, result, "compose file prod.yml not found")


def test_unknown_remote_is_a_usage_error(deployed):
    deployed.push({"app.txt": "v2\n"}, "code")
    result = deployed.deploy("--remote", "upstream")
    assert_refused_as_configuration(deployed, result, "remote 'upstream' is not configured")


def test_unknown_branch_is_a_usage_error(deployed):
    result = deployed.deploy(DEPLOY_BRANCH="nosuch")
    assert_refused_as_configuration(
        deployed, result, "branch 'nosuch' does not exist on remote 'origin'"
    )


def test_branch_option_overrides_its_environment_variable(deployed):
    tip = deployed.push({"app.txt": "v2\n"}, "code")
    assert deployed.deploy("--branch", "main", DEPLOY_BRANCH="nosuch").returncode == 0
    assert deployed.head() == tip


def test_missing_compose_is_reported_before_the_tree_changes(deployed):
    deployed.push({"app.txt": "v2\n"}, "code")
    result = deployed.deploy(FAKE_DOCKER_FAIL="plugin,v1")
    assert result.returncode == 2
    assert "no compose command found" in error_line(result)
    assert deployed.head() == deployed.first
    assert deployed.actions() == []


@pytest.mark.parametrize(
    "args, env, expected",
    [
        (["--build", "sometimes"], {}, "--build: unknown build mode 'sometimes'"),
        ([], {"DEPLOY_BUILD": "sometimes"}, "DEPLOY_BUILD: unknown build mode 'sometimes'"),
        (["--lock-timeout", "soon"], {}, "--lock-timeout: 'soon' is not a number of seconds"),
        (
            [],
            {"DEPLOY_WAIT_TIMEOUT": "0"},
            "DEPLOY_WAIT_TIMEOUT: '0' is not a whole number of seconds",
        ),
        (["--wait-timeout", "2.5"], {}, "--wait-timeout: '2.5' is not a whole number of seconds"),
        ([], {"DEPLOY_PULL": "maybe"}, "DEPLOY_PULL: 'maybe' is not 1 or 0"),
        (["--branch", "main:evil"], {}, "--branch: 'main:evil' is not a valid branch name"),
        (["--compose", "'docker"], {}, "--compose: cannot split"),
        (["--status", "--force"], {}, "--status only prints"),
        (["--lock-file", " "], {}, "--lock-file: ' ' is blank"),
        (["--bogus"], {}, "unrecognized arguments: --bogus"),
    ],
    ids=[
        "build-flag",
        "build-env",
        "lock-timeout",
        "wait-timeout",
        "wait-timeout-fraction",
        "pull",
        "branch",
        "compose",
        "status-force",
        "blank-lock-file",
        "unknown-option",
    ],
)
def test_bad_option_value_is_a_usage_error(deployed, args, env, expected):
    deployed.push({"app.txt": "v2\n"}, "code")
    result = deployed.deploy(*args, **env)
    assert_refused_as_configuration(deployed, result, expected)


def test_blank_environment_values_count_as_unset(deployed):
    default_lock = deployed.app / ".git" / "webhook-deploy.lock"
    before = default_lock.read_text()
    blank = {"DEPLOY_LOCK_FILE": " ", "DEPLOY_COMPOSE_FILE": "\t", "DEPLOY_BRANCH": "  "}
    result = run_script(
        "deploy.py",
        "--app-dir",
        str(deployed.app),
        "--force",
        env=deployed.env(**blank),
        cwd=deployed.root,
    )
    assert result.returncode == 0, result.stderr
    assert default_lock.read_text() != before
    assert [path.name for path in deployed.root.iterdir() if not path.name.strip()] == []
    assert all(call["argv"][2:3] != ["-f"] for call in deployed.calls())


def test_compose_help_says_a_wrapper_must_exec():
    result = run_script("deploy.py", "--help")
    assert "a wrapper script must `exec` its command" in " ".join(result.stdout.split())


# --- git never prompts, and says what to do ----------------------------------

FAKE_SSH = """#!/bin/sh
printf '%s\\n' "$@" > "$FAKE_SSH_ARGS"
echo "ssh: Could not resolve hostname example.invalid: Name or service not known" >&2
exit 255
"""


def use_ssh_remote(host):
    ssh = host.bin / "ssh"
    ssh.write_text(FAKE_SSH)
    ssh.chmod(0o755)
    git("remote", "set-url", "origin", "ssh://git@example.invalid/app.git", cwd=host.app)
    return host.root / "ssh-args"


def test_ssh_remote_runs_ssh_in_batch_mode(deployed):
    args = use_ssh_remote(deployed)
    result = deployed.deploy(FAKE_SSH_ARGS=str(args))
    assert result.returncode == 1
    assert "git fetch origin failed: ssh: Could not resolve hostname" in error_line(result)
    assert "BatchMode=yes" in args.read_text().split()


def test_users_own_ssh_command_is_kept(deployed):
    args = use_ssh_remote(deployed)
    git("config", "core.sshCommand", "ssh -i /keys/deploy", cwd=deployed.app)
    assert deployed.deploy(FAKE_SSH_ARGS=str(args)).returncode == 1
    words = args.read_text().split()
    assert "/keys/deploy" in words and "BatchMode=yes" not in words


class _NeedsPassword(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(401)
        self.send_header("WWW-Authenticate", 'Basic realm="git"')
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


def test_https_remote_asking_for_a_password_fails_at_once(deployed):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _NeedsPassword)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/app.git"
        git("remote", "set-url", "origin", url, cwd=deployed.app)
        result = deployed.deploy()
    finally:
        server.shutdown()
    assert result.returncode == 1
    assert "terminal prompts disabled" in error_line(result)


def test_dubious_ownership_names_safe_directory(deployed):
    require(os.geteuid() == 0, "needs root to give the checkout to another user")
    for path in [deployed.app, *deployed.app.rglob("*")]:
        os.lchown(path, 12345, 12345)
    result = deployed.deploy()
    assert result.returncode == 2
    assert f"git config --global --add safe.directory {deployed.app}" in error_line(result)
    assert deployed.calls() == []


# --- --check -------------------------------------------------------------------


def test_check_passes_good_settings_without_git_or_docker(deployed):
    result = deployed.deploy("--check")
    assert result.returncode == 0, result.stderr
    assert f"settings ok: deploys origin/main in {deployed.app} (--build auto)" in result.stdout
    assert deployed.calls() == []


@pytest.mark.parametrize(
    "env, expected",
    [
        ({"DEPLOY_BUILD": "alwyas"}, "error: DEPLOY_BUILD: unknown build mode 'alwyas'"),
        ({"DEPLOY_WAIT_TIMEOUT": "soon"}, "error: DEPLOY_WAIT_TIMEOUT: 'soon' is not a whole"),
    ],
    ids=["build-mode", "wait-timeout"],
)
def test_check_fails_bad_settings_in_one_line(deployed, env, expected):
    result = deployed.deploy("--check", **env)
    assert result.returncode == 2
    assert error_line(result).startswith(expected)


def test_check_fails_an_app_dir_that_is_no_checkout(deployed, tmp_path):
    (tmp_path / "compose.yaml").write_text("services: {}\n")
    result = run_script("deploy.py", "--check", "--app-dir", str(tmp_path), env=deployed.env())
    assert result.returncode == 2
    assert error_line(result) == (
        f"error: app dir {tmp_path} is not a git checkout (no .git in it or above it)"
    )


def test_check_fails_an_app_dir_without_a_compose_file(deployed):
    (deployed.app / "docker-compose.yml").unlink()
    result = deployed.deploy("--check")
    assert result.returncode == 2
    assert error_line(result).startswith(f"error: no compose file in {deployed.app}")
