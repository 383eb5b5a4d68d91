"""Deprecated alias of launch/ray_setup.py's init_ray (kept until every caller has moved)."""
from .ray_setup import RayConfig
from .ray_setup import init_ray as _init_ray


def init_ray(num_cpus: int | None = None, address: str | None = None) -> None:
    _init_ray(RayConfig(address=address, num_cpus=num_cpus, include_dashboard=False))
