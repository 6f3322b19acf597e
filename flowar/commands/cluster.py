"""Ray for the commands that scale out (``flowar-sample`` with several workers, ``flowar-serve``)."""

from __future__ import annotations

from flowar.errors import FlowARError


def start_ray(address: str | None, num_cpus: int | None):
    """Connect to a cluster, or start a local one on loopback without dashboard or usage stats."""
    import os
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    try:
        import ray
    except ImportError:
        raise FlowARError("Ray (the [serve] extra)", "it is not installed",
                          "pip install 'flowar-deploy[serve]' (or 'ray[data,serve]')") from None
    if ray.is_initialized():
        return ray
    kw = dict(include_dashboard=False, configure_logging=False, log_to_driver=False)
    if address:
        ray.init(address=address, **kw)
    else:
        ray.init(num_cpus=num_cpus, _node_ip_address="127.0.0.1", **kw)
    return ray
