"""Starting or joining Ray: embedded on this machine by default, an existing cluster when RAY_ADDRESS
(or an explicit address) is given. The embedded dashboard stays on loopback."""
import os

import ray


def init_ray(num_cpus: int | None = None, address: str | None = None) -> None:
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False, dashboard_host="127.0.0.1", log_to_driver=True)
