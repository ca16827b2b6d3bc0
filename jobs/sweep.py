"""molre's main job: a Ray Tune sweep with leaderboards.

    python jobs/sweep.py                      # the embedded default: local Ray, synthetic data, tiny backbone
    ray job submit --working-dir . -- python jobs/sweep.py --config search_spaces/X.yaml --storage s3://B/molre
    python jobs/sweep.py --resume             # finish an interrupted experiment of the same name
    python jobs/sweep.py --smoke              # 2 trials x 1 epoch

Same function as `molre sweep`; under `ray job submit` it uses the cluster it runs on.
"""

import os
import sys

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "platform"))

from molre.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["sweep", *sys.argv[1:]]))
