"""Starting or joining Ray: one rule for every molre entry point (train, sweep, preprocess).

``ray.init()`` joins an existing cluster when ``$RAY_ADDRESS`` names one or when ``ray start`` on this machine
left its address in Ray's temp dir (``ray_current_cluster``), and starts a private local Ray otherwise. A local
Ray is sized here (``num_cpus``); an existing cluster has its own size, and ``ray.init`` refuses ``num_cpus``
for one, so the two cases call it differently.
"""

from __future__ import annotations

import os


def existing_cluster() -> str | None:
    """The address of the cluster ``ray.init()`` would join, or None when it would start a local Ray."""
    if os.environ.get("RAY_ADDRESS"):
        return os.environ["RAY_ADDRESS"]
    # where ray.init() itself looks (Ray 2.60): the address `ray start` wrote in Ray's temp dir
    from ray._private.utils import read_ray_address

    return read_ray_address() or None


def start_or_join(num_cpus: int, **local_options) -> bool:
    """Join the existing cluster, else start a local Ray with ``num_cpus`` logical CPUs and ``local_options``
    (``ray.init`` keywords). Returns True when it joined a cluster (whose workers have their own environment)."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # a hospital platform reports nothing home
    import ray

    address = existing_cluster()
    if address:
        ray.init(address=address)
        return True
    ray.init(num_cpus=num_cpus, **local_options)
    return False
