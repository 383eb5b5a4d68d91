"""Placement: requests the cluster cannot hold fail at start naming role and shortfall; held resources
time out instead of hanging; actors land in their role's bundle. Embedded Ray (2 CPUs, 1 declared GPU)."""
import tempfile
from dataclasses import dataclass, field

import pytest

from dsarl.actors.placement import (InsufficientResourcesError, ResourceSpec, RoleResources, check_cluster_fits,
                                    create_placement_group, find_shortfalls, specs_from_config)
from dsarl.launch.config import load_config
from dsarl.launch.ray_setup import RayConfig, init_ray


@pytest.fixture(scope="module")
def ray_2cpu_1gpu():
    import ray

    with tempfile.TemporaryDirectory(prefix="dsp", dir="/tmp") as tmp:
        init_ray(RayConfig(num_cpus=2, num_gpus=1, include_dashboard=False), temp_dir=tmp)
        yield ray
        ray.shutdown()


@dataclass
class Resources:  # the shape a stage config gives its `resources:` section
    resources: dict[str, RoleResources] = field(default_factory=dict)


# ---------------------------------------------------------------- pure checks, no Ray

NODE = {"CPU": 8.0, "GPU": 2.0}


def test_fitting_request_has_no_shortfall():
    specs = [ResourceSpec("rollout", 2, 2, 0.5), ResourceSpec("learner", 1, 4, 1)]
    assert find_shortfalls(specs, {"CPU": 16.0, "GPU": 4.0}, [NODE, NODE]) == []


def test_each_role_and_the_total_are_named_with_what_is_missing():
    specs = [ResourceSpec("rollout", 4, 2, 1), ResourceSpec("learner", 2, 1, 0)]
    lines = find_shortfalls(specs, {"CPU": 8.0, "GPU": 2.0}, [NODE])
    assert lines == ["rollout: 4 x {CPU 2, GPU 1} = CPU 8, GPU 4; missing GPU 2",
                     "all roles together need CPU 10, GPU 4 (rollout CPU 8, GPU 4; learner CPU 2); "
                     "missing CPU 2, GPU 2"]


def test_a_bundle_no_single_node_holds_is_named_even_when_the_total_fits():
    lines = find_shortfalls([ResourceSpec("learner", 1, 12, 0)], {"CPU": 16.0}, [{"CPU": 8.0}, {"CPU": 8.0}])
    assert lines == ["learner: one actor needs {CPU 12}, which no single node has (largest node: CPU 8)"]


def test_strict_strategies_check_the_node_layout():
    specs = [ResourceSpec("reward", 3, 1, 0)]
    nodes = [{"CPU": 2.0}, {"CPU": 2.0}]
    assert find_shortfalls(specs, {"CPU": 4.0}, nodes, "PACK") == []
    assert "own node" in find_shortfalls(specs, {"CPU": 4.0}, nodes, "STRICT_SPREAD")[0]
    assert "one node" in find_shortfalls(specs, {"CPU": 4.0}, nodes, "STRICT_PACK")[0]


def test_invalid_specs_are_rejected_at_construction():
    with pytest.raises(ValueError, match="rollout"):
        ResourceSpec("rollout", 1, 0, 0)
    with pytest.raises(ValueError, match="whole"):
        ResourceSpec("learner", 1, 1, 1.5)


# ---------------------------------------------------------------- against Ray


def test_config_needing_100_gpus_fails_fast_naming_role_and_shortfall(ray_2cpu_1gpu, tmp_path):
    cfg_file = tmp_path / "big.yaml"
    cfg_file.write_text("resources:\n  rollout: {count: 2, num_cpus: 0.5, num_gpus: 0.5}\n"
                        "  learner: {count: 4, num_cpus: 1, num_gpus: 25}\n")
    specs = specs_from_config(load_config(Resources, cfg_file).resources)
    with pytest.raises(InsufficientResourcesError) as e:
        create_placement_group(specs, timeout_s=600)  # would wait 10 min if the check did not catch it
    msg = str(e.value)
    assert "cluster: CPU 2, GPU 1 on 1 node(s)" in msg
    assert "learner: 4 x {CPU 1, GPU 25} = CPU 4, GPU 100; missing CPU 2, GPU 99" in msg
    assert "rollout" in msg and "all roles together need CPU 5, GPU 101" in msg
    from ray.util import placement_group_table

    assert placement_group_table() == {}  # nothing was left pending


def test_roles_get_their_bundles_and_fractional_gpus_share_one_device(ray_2cpu_1gpu):
    ray = ray_2cpu_1gpu
    specs = [ResourceSpec("rollout", 2, 0.5, 0.5), ResourceSpec("learner", 1, 1, 0)]
    placement = create_placement_group(specs, timeout_s=60)
    try:
        assert placement.bundles == {"rollout": [0, 1], "learner": [2]}

        @ray.remote
        def where():
            ctx = ray.get_runtime_context()
            return ctx.get_placement_group_id(), ray.get_gpu_ids()

        opts = placement.actor_options("rollout", 1)
        assert opts["num_gpus"] == 0.5 and opts["scheduling_strategy"].placement_group_bundle_index == 1
        pg_id, gpus = ray.get(where.options(**opts).remote(), timeout=120)
        assert pg_id == placement.group.id.hex() and len(gpus) == 1
    finally:
        placement.remove()


def test_resources_held_by_others_time_out_instead_of_hanging(ray_2cpu_1gpu):
    holder = create_placement_group([ResourceSpec("holder", 2, 1, 0)], timeout_s=60)
    try:
        check_cluster_fits([ResourceSpec("learner", 1, 1, 0)])  # fits the cluster, but CPUs are taken
        with pytest.raises(InsufficientResourcesError,
                           match=r"not ready after 2s: asked for CPU 1, free now CPU 0, GPU 1"):
            create_placement_group([ResourceSpec("learner", 1, 1, 0)], timeout_s=2)
    finally:
        holder.remove()
    from ray.util import placement_group_table

    states = [pg["state"] for pg in placement_group_table().values()]
    assert "PENDING" not in states and "CREATED" not in states, states
