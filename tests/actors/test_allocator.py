"""Actors keep freed memory in glibc's heap (dsarl.actors.allocator), on a real local Ray: measured by the
minor page faults of allocating and writing 256 MB a second time, after freeing the first."""
import inspect
import platform
import subprocess
import sys

import pytest
import ray

from dsarl.actors.allocator import keep_freed_memory
from dsarl.actors.rollout_workers import RolloutWorker
from dsarl.models import DSAConfig

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="tunes glibc's malloc")

TINY = DSAConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, q_lora_rank=16, kv_lora_rank=16,
                 qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, index_n_heads=2, index_head_dim=8,
                 index_topk=4, intermediate_size=64, max_position_embeddings=32).to_dict()
PAGES = (256 << 20) // 4096


def second_allocation_faults(pages: int = PAGES) -> int:
    """Minor faults in this process while `pages` pages are malloc'ed and written after a block like it was
    freed. Straight through libc: a torch tensor's block may be split or moved by the small allocations
    around it, which makes its count vary from run to run (bench/grpo_step.py measures the effect on
    torch's activations: the 4000-token step)."""
    import ctypes
    import resource

    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
    size = pages * 4096
    block = libc.malloc(size)
    libc.memset(block, 1, size)
    libc.free(block)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block = libc.malloc(size)
    libc.memset(block, 1, size)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    libc.free(block)
    return faults


# Its source runs in the other processes: an actor's (a Ray worker cannot import this test module, so
# cloudpickle would fail to send the function by reference) and a plain subprocess's
PROBE_SOURCE = inspect.getsource(second_allocation_faults)


def faults_of_a_second_allocation(actor):
    """second_allocation_faults of 256 MB in the actor's process (an ObjectRef)."""
    def probe(_self, source=PROBE_SOURCE, pages=PAGES):  # a closure: cloudpickle sends it by value
        namespace = {"PAGES": pages}
        exec(source, namespace)
        return namespace["second_allocation_faults"](pages)
    return actor.__ray_call__.remote(probe)


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_a_rollout_worker_reuses_freed_memory_and_the_switch_turns_it_off(local_ray):
    tuned = ray.remote(RolloutWorker).options(num_cpus=0.5).remote(config=TINY)
    untuned = ray.remote(RolloutWorker).options(
        num_cpus=0.5, runtime_env={"env_vars": {"DSARL_KEEP_FREED_MEMORY": "0"}}).remote(config=TINY)
    try:
        kept, fresh = ray.get([faults_of_a_second_allocation(tuned), faults_of_a_second_allocation(untuned)])
        assert kept < PAGES // 10, kept  # the freed pages came back from the heap
        assert fresh > PAGES // 2, fresh  # glibc's default: a fresh mmap, every page faulted in again
    finally:
        ray.kill(tuned)
        ray.kill(untuned)


def test_outside_an_actor_nothing_is_tuned():
    assert keep_freed_memory() is False


# The probe in a plain process (no Ray): with anywhere=True the tuning applies outside an actor too.
PLAIN_PROBE = f"""import sys
from dsarl.actors.allocator import keep_freed_memory
PAGES = {PAGES}
{PROBE_SOURCE}
tuned = keep_freed_memory(anywhere=sys.argv[1] == "1")
print(tuned, second_allocation_faults())
"""


@pytest.mark.parametrize("anywhere", [True, False])
def test_a_bench_process_asks_for_the_actors_tuning_with_anywhere(anywhere):
    out = subprocess.run([sys.executable, "-c", PLAIN_PROBE, "1" if anywhere else "0"], capture_output=True,
                         text=True, check=True).stdout.split()
    tuned, faults = out[0] == "True", int(out[1])
    assert tuned is anywhere
    if anywhere:
        assert faults < PAGES // 10, faults
    else:
        assert faults > PAGES // 2, faults
