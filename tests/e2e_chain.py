"""The whole chain on real components, for the end-to-end test and benchmark.

    git push -> signed POST -> gunicorn + Django (webhook_view) -> trigger file
    -> watch_deploy.py (inotify) -> deploy.py -> Docker Compose v2 -> busybox httpd

Nothing here is a stand-in: a bare origin and the app's checkout in a temp
folder, a real WSGI server, the real watcher running the real deploy.py
against the Docker engine. The app is a Compose project whose image is built
FROM scratch with a static busybox (no registry needed). It serves two pages:
/code/index.html from the checkout (bind-mounted: a code change needs only a
recreate) and /image.txt baked into the image by the Dockerfile (a change
there needs a rebuild).
"""

import hashlib
import hmac
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

from conftest import GIT_IDENTITY, ROOT, git

SECRET = "end-to-end secret"
REPOSITORY = "example/shop"
BUSYBOX = Path("/bin/busybox")
DEPLOY_BOUND = 180  # seconds a deploy may take before a wait gives up

COMPOSE_FILE = """\
services:
  app:
    build: .
    init: true
    ports: ["127.0.0.1:{port}:8080"]
    volumes: ["./www:/www/code:ro"]
    command: {command}
    healthcheck:
      test: ["CMD", "/bin/busybox", "wget", "-q", "-O", "/dev/null", "http://127.0.0.1:8080/code/index.html"]
      interval: 1s
      timeout: 2s
      retries: 3
      start_period: 5s
"""
HTTPD = '["/bin/busybox", "httpd", "-f", "-p", "8080", "-h", "/www"]'
EXIT_AT_START = '["/bin/busybox", "sh", "-c", "exit 3"]'

DOCKERFILE = """\
FROM scratch
COPY busybox /bin/busybox
RUN ["/bin/busybox", "sh", "-c", "/bin/busybox mkdir -p /www/code && echo {image} > /www/image.txt"]
"""
BROKEN_DOCKERFILE = DOCKERFILE + 'RUN ["/bin/busybox", "false"]\n'


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(predicate, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def fetch(url, timeout=2.0):
    """The page's text, or None when it cannot be had."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.read().decode().strip()
    except (OSError, urllib.error.URLError):
        return None


class Poller:
    """Requests a page every 50 ms in a thread; records the failed window."""

    def __init__(self, url, interval=0.05):
        self.url = url
        self.interval = interval
        self.failures = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            started = time.monotonic()
            if fetch(self.url, timeout=1.0) is None:
                self.failures.append(started)
            self._stop.wait(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    @property
    def window(self):
        """Seconds from the first failed request to the last (0: none failed)."""
        if not self.failures:
            return 0.0
        return self.failures[-1] - self.failures[0]


class Chain:
    """Sets up and drives the whole chain in `workdir`."""

    def __init__(self, workdir):
        self.workdir = Path(workdir)
        self.origin = self.workdir / "origin.git"
        self.app = self.workdir / "shop"  # the host's checkout
        self.dev = self.workdir / "dev"  # the developer's clone that pushes
        self.shared = self.workdir / "shared"
        self.watch_log = self.workdir / "watcher.log"
        self.app_port = free_port()
        self.web_port = free_port()
        self.processes = []
        self.pushed = []  # (before, after) of every push
        self.foreign_tag = f"webhook-deploy-e2e-foreign-{self.web_port}"
        self.foreign_images = []

    # -- set-up ------------------------------------------------------------

    def start(self):
        self.shared.mkdir()
        git("init", "--bare", "-q", "-b", "main", str(self.origin), cwd=self.workdir)
        git("clone", "-q", str(self.origin), str(self.dev), cwd=self.workdir)
        shutil.copy(BUSYBOX, self.dev / "busybox")
        self.write(
            {
                "Dockerfile": DOCKERFILE.format(image="image-1"),
                "compose.yaml": COMPOSE_FILE.format(port=self.app_port, command=HTTPD),
                "www/index.html": "code-1\n",
            }
        )
        self.commit_and_push("first version")
        git("clone", "-q", str(self.origin), str(self.app), cwd=self.workdir)
        (self.app / ".env").write_text("SECRET_ON_THE_HOST=1\n")
        self._start_web()
        self._start_watcher()
        return self

    def environment(self):
        env = dict(os.environ, **GIT_IDENTITY)
        env.update(
            GITHUB_WEBHOOK_SECRET=SECRET,
            DEPLOY_TRIGGER_FILE=str(self.shared / "deploy_trigger.txt"),
            DEPLOY_BRANCH="main",
            DEPLOY_REPOSITORY=REPOSITORY,
            DEPLOY_WATCH_DIR=str(self.shared),
            DEPLOY_APP_DIR=str(self.app),
            DEPLOY_LOG_FILE=str(self.watch_log),
            DEPLOY_WAIT_TIMEOUT="60",
            DEPLOY_LOCK_TIMEOUT="300",
            DJANGO_SETTINGS_MODULE="tests.django_project.settings",
            PYTHONUNBUFFERED="1",
        )
        for leftover in ("DEPLOY_SHA", "DEPLOY_REF", "DEPLOY_DELIVERY", "DEPLOY_DRY_RUN"):
            env.pop(leftover, None)
        return env

    def _spawn(self, argv, name):
        log = open(self.workdir / f"{name}.out", "ab")
        process = subprocess.Popen(
            argv, cwd=ROOT, env=self.environment(), stdout=log, stderr=subprocess.STDOUT
        )
        log.close()
        self.processes.append(process)
        return process

    def _start_web(self):
        self._spawn(
            [
                sys.executable, "-m", "gunicorn",
                "--bind", f"127.0.0.1:{self.web_port}",
                "--workers", "2",
                "tests.django_project.wsgi",
            ],
            "gunicorn",
        )
        wait_until(self._web_answers, 30, "gunicorn to answer")

    def _web_answers(self):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{self.web_port}/webhook/", timeout=1)
        except urllib.error.HTTPError:
            return True  # 405 for a GET: the view is there
        except OSError:
            return False
        return True

    def _start_watcher(self):
        self.watcher = self._spawn(
            [sys.executable, str(ROOT / "watch_deploy.py")], "watcher"
        )
        wait_until(self.watch_log.exists, 30, "the watcher's log")

    def stop(self):
        for process in reversed(self.processes):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.processes:
            try:
                process.wait(timeout=DEPLOY_BOUND)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if self.foreign_images:
            subprocess.run(["docker", "image", "rm", "-f", *self.foreign_images],
                           capture_output=True, timeout=60)
        if (self.app / "compose.yaml").exists():
            subprocess.run(
                ["docker", "compose", "down", "--rmi", "local", "-v", "--remove-orphans", "-t", "1"],
                cwd=self.app, capture_output=True, timeout=120,
            )

    # -- the developer's side ---------------------------------------------

    def write(self, files):
        for name, content in files.items():
            path = self.dev / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(content)

    def commit_and_push(self, message, files=None):
        """Commit `files` in the dev clone and push; returns (before, after)."""
        if files:
            self.write(files)
        before = git("rev-parse", "--verify", "-q", "HEAD", cwd=self.dev, check=False) or "0" * 40
        git("add", "-A", cwd=self.dev)
        git("commit", "-q", "-m", message, cwd=self.dev)
        git("push", "-q", "origin", "HEAD:main", cwd=self.dev)
        after = git("rev-parse", "HEAD", cwd=self.dev)
        self.pushed.append((before, after))
        return before, after

    # -- GitHub's side -----------------------------------------------------

    def deliver(self, before, after, delivery=None):
        """POST the push delivery GitHub would send; returns (status, body)."""
        body = json.dumps(push_payload(before, after), separators=(",", ":")).encode()
        delivery = delivery or str(uuid.uuid4())
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.web_port}/webhook/",
            data=body,
            method="POST",
            headers={
                "Content-Type": "application/json",
                "User-Agent": "GitHub-Hookshot/e2e",
                "X-GitHub-Event": "push",
                "X-GitHub-Delivery": delivery,
                "X-GitHub-Hook-ID": "1",
                "X-Hub-Signature": "sha1=" + hmac.new(SECRET.encode(), body, hashlib.sha1).hexdigest(),
                "X-Hub-Signature-256": "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest(),
            },
        )
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read() or b"{}")

    def push_and_deliver(self, message, files):
        before, after = self.commit_and_push(message, files)
        status, body = self.deliver(before, after)
        assert 200 <= status < 300, (status, body)
        return after

    # -- the host's side ---------------------------------------------------

    def url(self, page):
        return f"http://127.0.0.1:{self.app_port}/{page}"

    def served(self, page="code/index.html"):
        return fetch(self.url(page))

    def wait_served(self, expected, page="code/index.html", timeout=DEPLOY_BOUND):
        wait_until(lambda: self.served(page) == expected, timeout, f"{page} to serve {expected!r}")

    def log_text(self):
        return self.watch_log.read_text(errors="replace") if self.watch_log.exists() else ""

    def deploys_finished(self):
        """How many deploys the watcher has seen end, successful or not."""
        return len(DEPLOY_FINISHED.findall(self.log_text()))

    def deploys_started(self):
        return len(DEPLOY_STARTED.findall(self.log_text()))

    def wait_deploys_finished(self, count, timeout=DEPLOY_BOUND):
        wait_until(lambda: self.deploys_finished() >= count, timeout, f"{count} finished deploys")
        # Let a coalesced follow-up deploy, if any, start and finish too.
        wait_until(lambda: self.deploys_started() == self.deploys_finished(),
                   timeout, "the watcher to be idle")

    def container_id(self):
        result = subprocess.run(
            ["docker", "compose", "ps", "-q", "app"], cwd=self.app,
            capture_output=True, text=True, timeout=60,
        )
        return result.stdout.strip()

    def image_id(self):
        """The image the running app container was created from."""
        result = subprocess.run(
            ["docker", "inspect", "-f", "{{.Image}}", self.container_id()],
            capture_output=True, text=True, timeout=60,
        )
        return result.stdout.strip()

    def dangling_foreign_image(self):
        """Leave a dangling image of another project on the engine; returns its id."""
        context = self.workdir / "foreign"
        context.mkdir(exist_ok=True)
        ids = []
        for version in ("1", "2"):
            (context / "version.txt").write_text(version)
            (context / "Dockerfile").write_text("FROM scratch\nCOPY version.txt /\n")
            subprocess.run(
                ["docker", "build", "-q", "-t", f"{self.foreign_tag}", str(context)],
                check=True, capture_output=True, timeout=120,
            )
            ids.append(self.image_id_of(self.foreign_tag))
        self.foreign_images = ids
        return ids[0]

    def image_id_of(self, name):
        result = subprocess.run(
            ["docker", "image", "inspect", "-f", "{{.Id}}", name],
            capture_output=True, text=True, timeout=60,
        )
        return result.stdout.strip()

    def image_exists(self, image):
        return bool(self.image_id_of(image))

    def app_head(self):
        return git("rev-parse", "HEAD", cwd=self.app)

    def status(self):
        result = subprocess.run(
            [sys.executable, str(ROOT / "deploy.py"), "--status"],
            cwd=self.app, env=self.environment(), capture_output=True, text=True, timeout=60,
        )
        return result.stdout + result.stderr


# The watcher's log lines for a deploy's start and end (see watch_deploy.py).
DEPLOY_STARTED = re.compile(r"deploy started: ")
DEPLOY_FINISHED = re.compile(r"deploy (succeeded|failed|killed) |cannot run the deploy command")


def push_payload(before, after):
    """A push delivery shaped like GitHub's (compact, as GitHub sends it)."""
    owner, name = REPOSITORY.split("/")
    return {
        "ref": "refs/heads/main",
        "before": before,
        "after": after,
        "repository": {
            "id": 1,
            "name": name,
            "full_name": REPOSITORY,
            "private": True,
            "owner": {"name": owner, "login": owner},
            "default_branch": "main",
        },
        "pusher": {"name": "dev", "email": "dev@example.invalid"},
        "sender": {"login": "dev", "id": 2},
        "created": before == "0" * 40,
        "deleted": False,
        "forced": False,
        "base_ref": None,
        "compare": f"https://github.com/{REPOSITORY}/compare/{before[:12]}...{after[:12]}",
        "commits": [{"id": after, "distinct": True, "message": "change"}],
        "head_commit": {"id": after, "message": "change"},
    }
