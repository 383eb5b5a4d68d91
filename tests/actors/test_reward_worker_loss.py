"""A reward worker SIGKILLed mid-chunk (issue #21 item 1): its chunk is scored again on a replacement
worker; a sample no worker scored stays unscored (None), never a made-up value, is kept out of the
learner's groups, counted, and flagged in the rollout log.

The fault is real: a reward plug-in stalls inside the worker's reward process and tells the test the
worker's pid, which the test kills with SIGKILL, as the kernel's OOM killer would."""
import json
import os
import signal
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from dsarl.actors.reward_workers import RewardPool
from dsarl.data.rollout_schema import read_rollouts, table_to_records
from dsarl.data.step_types import Completion, ScoredRound
from dsarl.launch.grpo_loop import GRPOConfig, GRPOTrainer, PromptData, RolloutConfig, run_grpo
from dsarl.learner.group_building import build_groups
from dsarl.models import DSAConfig, build_model, save_pretrained
from dsarl.rewards.config import RewardComponentConfig as C, RewardConfig
from dsarl.rewards.types import RewardSample

pytestmark = pytest.mark.usefixtures("reward_ray")  # tests/actors/conftest.py


def make_pool(num_workers: int, chunk_retries: int = 1) -> RewardPool:
    # timeout_s well above the plug-in's stall: the reward call's own limit must not end the stall (that
    # would be a failed call, issue #19), only the worker's death may
    return RewardPool(RewardConfig([C("math_answer"), C("reward_plugins:stalls_when_told", weight=0.5, label="len")],
                                   timeout_s=300.0, num_workers=num_workers, num_cpus_per_worker=0.5,
                                   chunk_retries=chunk_retries))


def samples_of(n_groups: int, stall_dir: Path, stalling_groups: set[int]) -> list[RewardSample]:
    """Group gid's sample k answers \\boxed{k} to a question whose answer is 1."""
    return [RewardSample("q", rf"\boxed{{{k}}}", 10 + k,
                         {"answer": "1", **({"stall_dir": str(stall_dir)} if gid in stalling_groups else {})},
                         group_id=gid, sample_index=k)
            for gid in range(n_groups) for k in range(2)]


def expected(sample: RewardSample) -> dict[str, float]:
    """What scoring gives, computed here: math_answer 1 for \\boxed{1}, len = the completion's length."""
    correct = 1.0 if sample.completion == r"\boxed{1}" else 0.0
    length = float(len(sample.completion))
    return {"math_answer": correct, "len": length, "total": correct + 0.5 * length}


def kill_stalled_workers(stall_dir: Path, times: int, killed: list[int]) -> threading.Thread:
    """In a thread: each time the plug-in reports a stall, SIGKILL the worker it names."""
    def run():
        for n in range(times):
            marker, t_end = stall_dir / f"stalled-{n}", time.monotonic() + 120
            while not marker.exists() and time.monotonic() < t_end:
                time.sleep(0.05)
            if not marker.exists():
                return
            killed.append(int(marker.read_text()))
            os.kill(killed[-1], signal.SIGKILL)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_a_chunk_whose_worker_is_killed_is_scored_again_on_a_replacement(tmp_path):
    (tmp_path / "stalls").write_text("1")
    samples = samples_of(2, tmp_path, stalling_groups={0, 1})
    pool = make_pool(num_workers=1)
    try:
        (pid,) = pool.pids()
        killed: list[int] = []
        thread = kill_stalled_workers(tmp_path, 1, killed)
        results, metrics = pool.score(samples)
        thread.join()
        assert killed == [pid]  # the fault hit the pool's worker, mid-chunk
        assert pool.pids()[0] != pid
        # real scores, not the components' failure values (math_answer 0, len 0)
        assert results == [expected(s) for s in samples]
        assert metrics["reward/worker_failures"] == 1.0 and metrics["reward/chunk_retries"] == 1.0
        assert metrics["reward/unscored_samples"] == 0.0 and metrics["reward/failures"] == 0.0
        uninterrupted, metrics = pool.score(samples)  # the stall is used up: nothing is killed this time
        assert uninterrupted == results
        assert metrics["reward/worker_failures"] == 0.0 and metrics["reward/chunk_retries"] == 0.0
    finally:
        pool.shutdown()


def completions_of(samples: list[RewardSample]) -> list[Completion]:
    return [Completion(prompt_index=s.group_id, sample_index=s.sample_index, prompt_ids=[1, 2 + s.group_id],
                       token_ids=[5] * s.num_tokens, logprobs=[-0.1] * s.num_tokens, finish_reason="stop",
                       text=s.completion, weight_version=0) for s in samples]


def test_a_chunk_lost_on_every_try_stays_unscored_out_of_the_batch_and_flagged(tmp_path):
    (tmp_path / "stalls").write_text("2")  # the first worker and its replacement both die
    samples = samples_of(3, tmp_path, stalling_groups={1})
    pool = make_pool(num_workers=2, chunk_retries=1)
    try:
        pids = pool.pids()
        killed: list[int] = []
        thread = kill_stalled_workers(tmp_path, 2, killed)
        results, metrics = pool.score(samples)
        thread.join()
    finally:
        pool.shutdown()
    assert len(killed) == 2 and killed[0] in pids and killed[1] not in pids
    assert results[2:4] == [None, None]  # group 1: no worker scored it
    assert results[:2] + results[4:] == [expected(s) for s in samples[:2] + samples[4:]]
    assert metrics["reward/unscored_samples"] == 2.0
    assert metrics["reward/worker_failures"] == 2.0 and metrics["reward/chunk_retries"] == 1.0
    assert metrics["reward/failures"] == 0.0  # the worker failed, not a reward component
    assert metrics["reward/math_answer/mean"] == 0.5  # over the 4 scored samples

    # the driver's next steps, unchanged: the learner's groups and the rollout log
    rows = [{"prompt": "q", "answer": "1", "id": f"p{g}"} for g in range(3)]
    comps = completions_of(samples)
    groups, info = build_groups([ScoredRound(rows, comps, results)], group_size=2, target=3, std_normalize=False,
                                filter_uniform=False)
    assert [g.prompt_ids for g in groups] == [[1, 2], [1, 4]]  # group 1 never reaches the loss
    totals = [expected(s)["total"] for s in samples]
    assert [g.advantages for g in groups] == [[(totals[0] - totals[1]) / 2, (totals[1] - totals[0]) / 2]] * 2
    assert info["groups/dropped_unscored"] == 1.0 and info["groups/kept"] == 2.0
    assert info["reward/mean"] == pytest.approx(sum(totals[:2] + totals[4:]) / 4)

    GRPOTrainer._write_rollouts(SimpleNamespace(run_dir=tmp_path), 1, rows, comps, results)
    records = table_to_records(read_rollouts(tmp_path / "rollouts" / "step_000001.parquet"))
    assert [r.reward_failed for r in records] == [False, False, True, True, False, False]
    assert [r.reward for r in records] == [totals[0], totals[1], None, None, totals[4], totals[5]]
    assert records[2].reward_components is None and records[0].reward_components == {
        k: v for k, v in expected(samples[0]).items() if k != "total"}


def test_a_grpo_step_whose_reward_worker_is_killed_trains_only_on_scored_groups(tmp_path):
    """Through the real driver: one of two reward workers SIGKILLed mid-step, no retries. The step goes on;
    its lost groups are counted, dropped from the learner's batch and flagged in the rollout log; accuracy
    is over the scored samples only."""
    cfg = DSAConfig(hidden_size=48, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, q_lora_rank=24,
                    kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, index_n_heads=2,
                    index_head_dim=16, index_topk=4)
    init = str(save_pretrained(build_model(cfg, seed=0), tmp_path / "init"))
    stall_dir = tmp_path / "stall"
    stall_dir.mkdir()
    (stall_dir / "stalls").write_text("1")  # the first reward call of the run stalls, whichever worker has it
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps({"prompt": f"{a}+1=", "answer": str(a + 1), "stall_dir": str(stall_dir)})
                             + "\n" for a in range(6)))
    G, P = 2, 4
    run = GRPOConfig(
        init_from=init, run_dir=str(tmp_path / "run"), steps=1, prompts_per_step=P, group_size=G, save_every=1,
        data=PromptData(path=str(train)), rollout=RolloutConfig(num_cpus_per_worker=0.25, max_new_tokens=4),
        rewards=RewardConfig([C("math_answer"), C("reward_plugins:stalls_when_told", label="len")], timeout_s=300.0,
                             num_workers=2, num_cpus_per_worker=0.25, chunk_retries=0),
        learner_num_cpus=0.5, eval_samples=0, tensorboard=False)
    killed: list[int] = []
    thread = kill_stalled_workers(stall_dir, 1, killed)
    run_grpo(run, show_progress=False)
    thread.join()
    assert len(killed) == 1
    (metrics,) = [m for m in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())
                  if m["step"] == 1]
    logged = pq_rows(tmp_path / "run" / "rollouts" / "step_000001.parquet")
    failed_groups = {r.group_id for r in logged if r.reward_failed}
    assert len(failed_groups) == P // 2  # the killed worker's chunk: two of the four groups, each whole
    assert all(r.reward is None and r.reward_components is None for r in logged if r.reward_failed)
    assert sum(r.reward_failed for r in logged) == G * len(failed_groups) == metrics["reward/unscored_samples"]
    assert metrics["groups/dropped_unscored"] == len(failed_groups)
    assert metrics["groups/kept"] == P - len(failed_groups)  # what the learner trained on
    assert metrics["reward/worker_failures"] == 1.0 and metrics["reward/chunk_retries"] == 0.0
    scored = [r for r in logged if not r.reward_failed]
    assert metrics["accuracy"] == sum(r.reward_components["math_answer"] > 0.5 for r in scored) / len(scored)
    assert metrics["reward/mean"] == pytest.approx(sum(r.reward for r in scored) / len(scored))


def pq_rows(path: Path):
    return table_to_records(read_rollouts(path))


def test_a_sample_that_kills_every_worker_is_isolated_to_its_own_group():
    """One group of four holds a sample whose reward SIGKILLs its worker each time: the chunk is lost on
    both tries, then scored by halves; only the poisoned group stays unscored, the others get real scores."""
    pool = RewardPool(RewardConfig([C("math_answer"), C("reward_plugins:kills_its_worker_if", weight=0.5, label="len")],
                                   timeout_s=300.0, num_workers=1, num_cpus_per_worker=0.5, chunk_retries=1))
    samples = [RewardSample("q", rf"\boxed{{{k}}}", 10 + k, {"answer": "1", **({"poison": 1} if gid == 2 and k else {})},
                            group_id=gid, sample_index=k) for gid in range(4) for k in range(2)]
    try:
        results, metrics = pool.score(samples)
    finally:
        pool.shutdown()
    assert results[4:6] == [None, None]  # group 2, both samples (its group reward could not be computed)
    assert results[:4] + results[6:] == [expected(s) for s in samples[:4] + samples[6:]]
    # tries: whole chunk twice (lost), halves {0,1} (scored) and {2,3} (lost), then {2} (lost) and {3}
    assert metrics["reward/worker_failures"] == 4.0 and metrics["reward/chunk_retries"] == 5.0
    assert metrics["reward/unscored_samples"] == 2.0 and metrics["reward/failures"] == 0.0


def test_a_run_whose_reward_workers_die_on_every_sample_stops_saying_so(tmp_path):
    """Every sample's reward kills its worker: no step has a scored group. The run stops after
    fault_tolerance.max_unscored_steps such steps in a row, with an error saying what happened and how to
    resume, instead of training on nothing for ever (or on made-up scores)."""
    from dsarl.launch.grpo_loop import FaultToleranceConfig, RewardWorkersLost

    cfg = DSAConfig(hidden_size=48, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, q_lora_rank=24,
                    kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, index_n_heads=2,
                    index_head_dim=16, index_topk=4)
    init = str(save_pretrained(build_model(cfg, seed=0), tmp_path / "init"))
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps({"prompt": f"{a}+1=", "answer": str(a + 1), "poison": 1}) + "\n"
                             for a in range(6)))
    run = GRPOConfig(
        init_from=init, run_dir=str(tmp_path / "run"), steps=5, prompts_per_step=2, group_size=2, save_every=1,
        data=PromptData(path=str(train)), rollout=RolloutConfig(num_cpus_per_worker=0.25, max_new_tokens=4),
        rewards=RewardConfig([C("reward_plugins:kills_its_worker_if")], num_workers=1, num_cpus_per_worker=0.25,
                             chunk_retries=0),
        fault_tolerance=FaultToleranceConfig(max_unscored_steps=2), learner_num_cpus=0.5, eval_samples=0,
        tensorboard=False)
    with pytest.raises(RewardWorkersLost, match=r"step 2: no sample scored for 2 step\(s\) in a row.*--resume"):
        run_grpo(run, show_progress=False)
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in logged if m["step"] > 0] == [1]  # step 1 logged (nothing learned), step 2 stopped
    assert logged[-1]["groups/dropped_unscored"] == 2.0 and logged[-1]["reward/unscored_samples"] == 4.0
