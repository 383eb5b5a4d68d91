"""Issue #22 item 3: GRPO across several Ray nodes (`ray.cluster_utils.Cluster`: one raylet per "node" on
this machine). Rollout workers, reward workers and learner ranks are spread over the nodes by the
placement group; the run's numbers equal the one-node run's; losing a worker node mid-run is recovered
(its bundles are placed again on the surviving node, Ray restarts the rollout worker, the reward chunk
is scored again, the learner group restarts from the last checkpoint) without losing or repeating a step.
"""
import json

import pytest
import ray
from ray.cluster_utils import Cluster

from dsarl.launch.grpo_loop import FaultToleranceConfig, GRPOConfig, GRPOTrainer, PromptData, RolloutConfig
from dsarl.rewards.config import RewardComponentConfig, RewardConfig

pytestmark = pytest.mark.slow
DETERMINISTIC = ("reward/mean", "accuracy", "response_length/mean", "loss", "entropy", "grad_norm", "weight_version")


def grpo(init, run_dir, strategy="PACK", steps=3, **ft) -> GRPOConfig:
    return GRPOConfig(
        init_from=init, run_dir=str(run_dir), steps=steps, prompts_per_step=4, group_size=4, save_every=1,
        data=PromptData(task="arithmetic", task_kwargs={"max_digits": 1}, num_train=32, num_test=4),
        rollout=RolloutConfig(num_workers=2, num_cpus_per_worker=0.5, max_new_tokens=8, max_batch_size=16),
        rewards=RewardConfig(components=[RewardComponentConfig(name="math_answer")], num_workers=2,
                             num_cpus_per_worker=0.25),
        learner_ranks=2, learner_num_cpus=0.5, placement_strategy=strategy,
        fault_tolerance=FaultToleranceConfig(**ft), eval_samples=4, tensorboard=False)


def metrics_of(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def assert_same_run(got, want):
    assert [m["step"] for m in got] == [m["step"] for m in want]
    for g, w in zip(got, want):
        for key in DETERMINISTIC:
            if key in w:
                assert g[key] == pytest.approx(w[key], rel=1e-6, abs=1e-7), (g["step"], key)


def bundle_nodes(trainer) -> dict[str, set[str]]:
    """role -> the node ids its bundles sit on, from Ray's placement-group table."""
    table = ray.util.placement_group_table(trainer.placement.group)["bundles_to_node_id"]
    return {role: {table[i] for i in idx} for role, idx in trainer.placement.bundles.items()}


@pytest.fixture(scope="module")
def one_node_metrics(init_checkpoint, tmp_path_factory):
    ray.init(num_cpus=4, include_dashboard=False)
    try:
        run_dir = tmp_path_factory.mktemp("one-node")
        GRPOTrainer(grpo(init_checkpoint, run_dir, steps=4)).fit(show_progress=False)
        return metrics_of(run_dir)
    finally:
        ray.shutdown()


@pytest.fixture
def cluster(one_node_metrics):
    """A head with no CPUs (the driver only) and two 2-CPU worker nodes."""
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    nodes = [c.add_node(num_cpus=2), c.add_node(num_cpus=2)]
    c.wait_for_nodes()
    ray.init(address=c.address)
    yield c, nodes
    ray.shutdown()
    c.shutdown()


def test_a_run_spread_over_two_nodes_equals_the_one_node_run(cluster, init_checkpoint, tmp_path, one_node_metrics):
    c, nodes = cluster
    trainer = GRPOTrainer(grpo(init_checkpoint, tmp_path, strategy="SPREAD", steps=4))
    placed = bundle_nodes(trainer)
    assert set().union(*placed.values()) == {n.node_id for n in nodes}  # both worker nodes hold actors
    assert all(len(on) == 2 for on in placed.values()), placed  # each role's two actors on different nodes
    trainer.fit(show_progress=False)
    assert_same_run(metrics_of(tmp_path), one_node_metrics)


def test_losing_a_worker_node_mid_run_is_recovered_without_losing_a_step(
        cluster, init_checkpoint, tmp_path, one_node_metrics):
    c, nodes = cluster
    trainer = GRPOTrainer(grpo(init_checkpoint, tmp_path, strategy="SPREAD", steps=4, restart_from_checkpoint=True))
    step_fn = trainer.step
    removed = []

    def step_then_lose_a_node(step):
        if step == 2 and not removed:  # two steps done and checkpointed: a node goes, with its actors
            victim = nodes[1]
            c.remove_node(victim, allow_graceful=False)
            c.add_node(num_cpus=2)  # a replacement node joins, as an autoscaler would provide
            removed.append(victim.node_id)
        return step_fn(step)

    trainer.step = step_then_lose_a_node
    trainer.fit(show_progress=False)
    got = metrics_of(tmp_path)
    assert removed
    assert got[-1]["faults/rollout_restarts"] + got[-1]["faults/learner_restarts"] >= 1
    assert_same_run(got, one_node_metrics)


def test_a_lost_node_without_restarts_stops_naming_it_and_resume_continues(
        cluster, init_checkpoint, tmp_path, one_node_metrics):
    c, nodes = cluster
    cfg = grpo(init_checkpoint, tmp_path, strategy="SPREAD", steps=4, max_step_retries=0)
    trainer = GRPOTrainer(cfg)
    victim = nodes[1]
    assert victim.node_id in bundle_nodes(trainer)["learner"]  # SPREAD: one learner rank on each node
    step_fn = trainer.step

    def step_then_lose_a_node(step):
        if step == 2:
            c.remove_node(victim, allow_graceful=False)
        return step_fn(step)

    trainer.step = step_then_lose_a_node
    with pytest.raises(RuntimeError, match="--resume") as stopped:
        trainer.fit(show_progress=False)
    assert victim.node_id in str(stopped.value) or victim.node_id in repr(stopped.value.__cause__)
    c.add_node(num_cpus=2)
    c.wait_for_nodes()
    GRPOTrainer(cfg, resume=True).fit(show_progress=False)
    assert_same_run(metrics_of(tmp_path), one_node_metrics)  # no step lost or repeated, same numbers
