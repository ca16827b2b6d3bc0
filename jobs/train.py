"""One training run: `ray job submit -- python jobs/train.py --config run.yaml key=value ...` (or run it locally).

Same function as `molre train`; a local Ray is started when no cluster is reachable.
"""

import os
import sys

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "platform"))

from molre.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
