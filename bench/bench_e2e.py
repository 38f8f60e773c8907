"""Failed-request window of a rebuild deploy, through the whole real chain.

A poller requests the app's page every 50 ms while a push that changes the
Dockerfile goes through GitHub's delivery, the view, the watcher and
deploy.py. Baseline in the same run: the procedure's order (`down`, `build`,
`up -d --force-recreate`) run by hand on the same app.

Needs a Docker engine with Compose v2, and .venv (sh tests/run makes it).
Prints tab-separated rows: area, metric, value, target, ok|MISSED.
"""

import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from e2e_chain import DOCKERFILE, Chain, Poller  # noqa: E402

ROUNDS = 5
TARGET_WINDOW = 0.2  # seconds, with one container


def rebuild_through_chain(chain, number):
    finished = chain.deploys_finished()
    with Poller(chain.url("code/index.html")) as poller:
        chain.push_and_deliver(f"image {number}", {"Dockerfile": DOCKERFILE.format(image=f"image-{number}")})
        chain.wait_served(f"image-{number}", page="image.txt")
        chain.wait_deploys_finished(finished + 1)
    return poller.window


def rebuild_the_procedures_way(chain, number):
    """The seed's deploy.sh order, on the same checkout and engine."""
    chain.commit_and_push(f"by hand {number}", {"Dockerfile": DOCKERFILE.format(image=f"hand-{number}")})
    subprocess.run(["git", "pull", "-q", "--ff-only"], cwd=chain.app, check=True)
    with Poller(chain.url("code/index.html")) as poller:
        for argv in (["down"], ["build", "--pull"], ["up", "-d", "--force-recreate"]):
            subprocess.run(["docker", "compose", *argv], cwd=chain.app, check=True, capture_output=True)
        chain.wait_served(f"hand-{number}", page="image.txt")
    return poller.window


def main():
    with tempfile.TemporaryDirectory(prefix="bench-e2e-") as workdir:
        chain = Chain(workdir).start()
        try:
            before, after = chain.pushed[-1]
            chain.deliver(before, after)
            chain.wait_served("image-1", page="image.txt")
            chain.wait_deploys_finished(1)
            ours = [rebuild_through_chain(chain, n) for n in range(2, 2 + ROUNDS)]
            chain.watcher.terminate()
            chain.watcher.wait(timeout=120)
            theirs = [rebuild_the_procedures_way(chain, n) for n in range(3)]
        finally:
            chain.stop()
    median, baseline = statistics.median(ours), statistics.median(theirs)
    verdict = "ok" if median < TARGET_WINDOW else "MISSED"
    print(f"end-to-end\tfailed-request window, rebuild deploy (median of {ROUNDS})\t{median:.3f} s"
          f"\t< {TARGET_WINDOW} s\t{verdict}")
    print(f"end-to-end\tfailed-request window, rebuild deploy (worst of {ROUNDS})\t{max(ours):.3f} s\t-\tok")
    print(f"end-to-end\tbaseline: down, build, up (median of {len(theirs)})\t{baseline:.3f} s"
          f"\t-\t{baseline / median if median else float('inf'):.0f}x longer")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
