import os

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="module")
def ray_local():
    """One local Ray per test module (2 CPUs, capped object store)."""
    import ray

    ray.init(num_cpus=2, object_store_memory=1 << 30, include_dashboard=False,
             ignore_reinit_error=True, log_to_driver=False)
    yield ray
    ray.shutdown()
