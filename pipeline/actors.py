"""Sizing a stage's model-actor pool against the Ray cluster it runs on."""
from __future__ import annotations

import math
from typing import Mapping, Optional


def gpu_pool_size(pool_size: Optional[int], num_gpus: float, cluster: Mapping[str, float]) -> int:
    """Model actors in a pool: `pool_size` when given; else, for actors that take `num_gpus` > 0
    GPUs each, as many as the GPUs of `cluster` (`ray.cluster_resources()`) hold, at least 1;
    else (CPU actors) 1. An autoscaling cluster reports only the GPUs it has now: give the size."""
    if pool_size is not None:
        return pool_size
    if num_gpus <= 0:
        return 1
    return max(1, math.floor(cluster.get("GPU", 0.0) / num_gpus + 1e-9))
