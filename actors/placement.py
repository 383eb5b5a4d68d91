"""Resources for rollout workers, reward workers and learner ranks, reserved through one placement group.

A config asks for `count` actors of a role, each with `num_cpus` and `num_gpus` (fractional GPUs < 1
let roles share a GPU: two 0.5-GPU bundles PACK onto one device). Each actor gets its own bundle.

Ray waits forever for resources it does not have (a pending placement group or actor is not an
error), which is the "silent hang" users report. So:
  * `check_cluster_fits` compares the request against the cluster before anything is scheduled and
    raises `InsufficientResourcesError` naming each role and what is missing;
  * `create_placement_group` waits at most `timeout_s` (for resources that exist but are held by
    others) and then removes the group and raises, saying what is free now.

    specs = specs_from_config(cfg.resources)          # {"rollout": RoleResources(...), ...}
    placement = create_placement_group(specs, timeout_s=120)
    worker = RolloutWorker.options(**placement.actor_options("rollout", 0)).remote(...)
"""
from dataclasses import dataclass
from typing import Literal

Strategy = Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"]
RESOURCES = ("CPU", "GPU")
EPS = 1e-9


class InsufficientResourcesError(RuntimeError):
    """The cluster lacks (or cannot currently give) what the config asks for."""


@dataclass
class RoleResources:
    """The config section for one role (e.g. `resources.rollout` in a stage's YAML)."""
    count: int = 1  # actors of this role
    num_cpus: float = 1.0  # per actor
    num_gpus: float = 0.0  # per actor; < 1 shares a GPU with other roles' bundles


@dataclass(frozen=True)
class ResourceSpec:
    role: str
    count: int
    num_cpus: float
    num_gpus: float = 0.0

    def __post_init__(self):
        if self.count < 0:
            raise ValueError(f"{self.role}: count must be >= 0, got {self.count}")
        if self.num_cpus < 0 or self.num_gpus < 0:
            raise ValueError(f"{self.role}: num_cpus and num_gpus must be >= 0, got {self.num_cpus}, {self.num_gpus}")
        if self.num_gpus > 1 and self.num_gpus != int(self.num_gpus):
            raise ValueError(f"{self.role}: num_gpus above 1 must be whole (Ray shares only one GPU "
                             f"fractionally), got {self.num_gpus}")
        if self.count and not self.bundle:
            raise ValueError(f"{self.role}: an actor needs num_cpus or num_gpus > 0 (Ray rejects empty bundles)")

    @property
    def bundle(self) -> dict[str, float]:
        return {k: v for k, v in (("CPU", self.num_cpus), ("GPU", self.num_gpus)) if v > 0}

    @property
    def total(self) -> dict[str, float]:
        return {k: v * self.count for k, v in self.bundle.items()}


def specs_from_config(resources: dict[str, RoleResources]) -> list[ResourceSpec]:
    return [ResourceSpec(role, r.count, float(r.num_cpus), float(r.num_gpus)) for role, r in resources.items()]


def _fmt(resources: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:g}" for k, v in resources.items() if v > EPS) or "nothing"


def _missing(need: dict[str, float], have: dict[str, float]) -> dict[str, float]:
    return {k: v - have.get(k, 0.0) for k, v in need.items() if v > have.get(k, 0.0) + EPS}


def _fits(bundle: dict[str, float], node: dict[str, float]) -> bool:
    return not _missing(bundle, node)


def find_shortfalls(specs: list[ResourceSpec], total: dict[str, float], nodes: list[dict[str, float]],
                    strategy: Strategy = "PACK") -> list[str]:
    """Lines describing what does not fit: per role against the whole cluster, all roles together, and
    bundles no single node can hold (or, for STRICT_* strategies, the node layout they require).
    Empty when the request fits. Pure: `total` and `nodes` are resource dicts as Ray reports them."""
    lines = []
    active = [s for s in specs if s.count]
    for s in active:
        if miss := _missing(s.total, total):
            lines.append(f"{s.role}: {s.count} x {{{_fmt(s.bundle)}}} = {_fmt(s.total)}; "
                         f"missing {_fmt(miss)}")
    need = {k: sum(s.total.get(k, 0.0) for s in active) for k in RESOURCES}
    if len(active) > 1 and (miss := _missing(need, total)):
        by_role = "; ".join(f"{s.role} {_fmt(s.total)}" for s in active)
        lines.append(f"all roles together need {_fmt(need)} ({by_role}); missing {_fmt(miss)}")
    biggest = {k: max((n.get(k, 0.0) for n in nodes), default=0.0) for k in RESOURCES}
    for s in active:
        if not any(_fits(s.bundle, n) for n in nodes) and not _missing(s.total, total):
            lines.append(f"{s.role}: one actor needs {{{_fmt(s.bundle)}}}, which no single node has "
                         f"(largest node: {_fmt(biggest)})")
    if strategy == "STRICT_PACK" and not lines and not any(_fits(need, n) for n in nodes):
        lines.append(f"STRICT_PACK puts every bundle on one node: needs {_fmt(need)}, largest node has "
                     f"{_fmt(biggest)}")
    n_bundles = sum(s.count for s in active)
    if strategy == "STRICT_SPREAD" and n_bundles > len(nodes):
        lines.append(f"STRICT_SPREAD puts each of the {n_bundles} bundles on its own node; the cluster "
                     f"has {len(nodes)} node(s)")
    return lines


def _cluster_view() -> tuple[dict[str, float], list[dict[str, float]]]:
    import ray

    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    return dict(ray.cluster_resources()), nodes


def check_cluster_fits(specs: list[ResourceSpec], strategy: Strategy = "PACK") -> None:
    """Raises InsufficientResourcesError, naming each role and the missing CPUs/GPUs, if the connected
    Ray cluster could never hold these actors. Call after init_ray, before creating anything."""
    total, nodes = _cluster_view()
    lines = find_shortfalls(specs, total, nodes, strategy)
    if lines:
        have = _fmt({k: total.get(k, 0.0) for k in RESOURCES})
        raise InsufficientResourcesError(
            f"the Ray cluster cannot hold this config's actors (cluster: {have} on {len(nodes)} node(s)):\n  "
            + "\n  ".join(lines)
            + "\nLower the counts/num_cpus/num_gpus in the config's resources, or add nodes.")


@dataclass
class Placement:
    """A ready placement group and which of its bundles belong to which role."""
    group: object  # ray.util.placement_group.PlacementGroup
    bundles: dict[str, list[int]]  # role -> bundle indices, one per actor
    specs: dict[str, ResourceSpec]

    def scheduling_strategy(self, role: str, i: int):
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        # Child tasks are not captured: they would queue for this bundle's already-taken resources.
        return PlacementGroupSchedulingStrategy(self.group, placement_group_bundle_index=self.bundles[role][i])

    def actor_options(self, role: str, i: int) -> dict:
        """Keyword arguments for `ActorClass.options(...)`: actor `i` of `role` takes its whole bundle."""
        spec = self.specs[role]
        return {"num_cpus": spec.num_cpus, "num_gpus": spec.num_gpus,
                "scheduling_strategy": self.scheduling_strategy(role, i)}

    def remove(self) -> None:
        from ray.util import remove_placement_group

        remove_placement_group(self.group)


def create_placement_group(specs: list[ResourceSpec], strategy: Strategy = "PACK", timeout_s: float = 120.0,
                           name: str = "") -> Placement:
    """Checks the request against the cluster, then reserves one bundle per actor and waits for them at
    most `timeout_s` seconds. Raises InsufficientResourcesError instead of waiting forever."""
    import ray
    from ray.util import placement_group, remove_placement_group

    check_cluster_fits(specs, strategy)
    bundles, index = [], {}
    for s in specs:
        index[s.role] = list(range(len(bundles), len(bundles) + s.count))
        bundles += [s.bundle] * s.count
    if not bundles:
        raise ValueError("create_placement_group: no actors requested (every count is 0)")
    group = placement_group(bundles, strategy=strategy, name=name)
    if not group.wait(timeout_seconds=timeout_s):
        remove_placement_group(group)
        free = ", ".join(f"{k} {ray.available_resources().get(k, 0.0):g}" for k in RESOURCES)
        asked = _fmt({k: sum(b.get(k, 0.0) for b in bundles) for k in RESOURCES})
        roles = ", ".join(f"{s.role} x{s.count}" for s in specs if s.count)
        raise InsufficientResourcesError(
            f"placement group for {roles} not ready after {timeout_s:g}s: asked for {asked}, free now {free}. "
            "The cluster has the resources but other jobs, actors or placement groups hold them (see `ray status`); "
            "the request was withdrawn.")
    return Placement(group, index, {s.role: s for s in specs})

