"""How much of a decode forward is the framework and how much the maths: the model's cached decode forward
(what the native engine runs per generated token) against the same step written flat, as a static-shape
function of plain tensor ops over the same weights, run eagerly and through torch.compile.

    python bench/decode_floor.py [--batch 1 64] [--prompt 27] [--rounds 6] [--no-compile]

The flat step covers the bench model's layout (bench/grpo_step.py: dense attention, SwiGLU MLP; MoE and
indexer layers are out of its scope): each layer's absorbed MLA over a latent cache of fixed length,
masked past each row's position, the new row attending as one extra column so the cache is only read
inside the step (a write inside a compiled graph copied the whole cache), and written after it. Its
logits are checked against the model's before any timing. The three are timed in interleaved rounds
(this VM's speed drifts within minutes); one JSON line per batch size: per-round medians in ms, their
medians, and the compile time. Batch 64 is the 16-token GRPO step's decode (8 prompts x 8 samples).
"""
import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from grpo_step import MODEL  # noqa: E402  the model bench/grpo_step.py times

from dsarl.actors.allocator import keep_freed_memory  # noqa: E402
from dsarl.models import DSAConfig, StaticKVCache, build_model  # noqa: E402
from dsarl.models.rope import rope_for_config  # noqa: E402


class FlatDecode:
    """One dense-attention decode step of a SwiGLU DSA model as plain tensor ops (weights pre-laid)."""

    def __init__(self, model, max_len: int):
        cfg = model.config
        if "sparse" in cfg.layer_mlp_types:
            raise ValueError("the flat step covers SwiGLU MLPs only (no MoE layers)")
        self.cfg, self.S = cfg, max_len
        H, n, v, C = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
        sd = {k: t.detach() for k, t in model.state_dict().items()}

        def lin(name):  # [out, in] -> [in, out]: x @ w
            return sd[name].t().contiguous()

        self.layers = []
        for i in range(cfg.num_hidden_layers):
            p = f"model.layers.{i}."
            kv_b = sd[p + "self_attn.kv_b_proj.weight"].view(H, n + v, C)
            self.layers.append(dict(
                norm1=sd[p + "input_layernorm.weight"], q_a=lin(p + "self_attn.q_a_proj.weight"),
                q_norm=sd[p + "self_attn.q_a_layernorm.weight"], q_b=lin(p + "self_attn.q_b_proj.weight"),
                kv_a=lin(p + "self_attn.kv_a_proj_with_mqa.weight"), kv_norm=sd[p + "self_attn.kv_a_layernorm.weight"],
                w_uk=kv_b[:, :n].contiguous(), w_uv=kv_b[:, n:].transpose(1, 2).contiguous(),  # [H, n, C], [H, C, v]
                o=lin(p + "self_attn.o_proj.weight"), norm2=sd[p + "post_attention_layernorm.weight"],
                gate=lin(p + "mlp.gate_proj.weight"), up=lin(p + "mlp.up_proj.weight"), down=lin(p + "mlp.down_proj.weight")))
        self.embed, self.final_norm = sd["model.embed_tokens.weight"], sd["model.norm.weight"]
        self.head = lin("lm_head.weight")
        cos, sin = rope_for_config(cfg, torch.arange(max_len, device=self.embed.device)[None])
        self.cos, self.sin = cos[0], sin[0]  # [S, R/2]

    def _rms(self, x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.cfg.rms_norm_eps) * w

    @staticmethod
    def _rope(x, cos, sin):  # interleaved pairs (x[2i], x[2i+1])
        a, b = x[..., 0::2], x[..., 1::2]
        return torch.stack((a * cos - b * sin, a * sin + b * cos), dim=-1).flatten(-2)

    def step(self, tokens: torch.Tensor, pos: torch.Tensor, cache: torch.Tensor):
        """tokens, pos [B]; cache [L, B, S, C+R] holding each row's keys before pos (read only) ->
        (logits [B, V], the new latent rows [L, B, C+R])."""
        cfg, S = self.cfg, self.S
        H, n, R, C = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.kv_lora_rank
        B = tokens.shape[0]
        x = self.embed[tokens]
        cos, sin = self.cos[pos], self.sin[pos]  # [B, R/2]
        future = torch.arange(S, device=pos.device)[None, None, :] >= pos[:, None, None]  # [B, 1, S]
        new_rows = []
        for i, w in enumerate(self.layers):
            h = self._rms(x, w["norm1"])
            q = (self._rms(h @ w["q_a"], w["q_norm"]) @ w["q_b"]).view(B, H, n + R)
            q_pe = self._rope(q[..., n:], cos[:, None], sin[:, None])
            kv = h @ w["kv_a"]
            new = torch.cat([self._rms(kv[:, :C], w["kv_norm"]), self._rope(kv[:, C:], cos, sin)], dim=-1)
            new_rows.append(new)
            q_lat = torch.bmm(q[..., :n].transpose(0, 1), w["w_uk"]).transpose(0, 1)  # [B, H, C]
            q_abs = torch.cat([q_lat, q_pe], dim=-1)  # [B, H, C+R]
            old = torch.bmm(q_abs, cache[i].transpose(1, 2)).masked_fill(future, float("-inf"))  # [B, H, S]
            own = (q_abs * new[:, None]).sum(-1, keepdim=True)  # [B, H, 1]
            p = torch.softmax(torch.cat([old, own], dim=-1) * cfg.softmax_scale, dim=-1)
            o_lat = torch.bmm(p[..., :S], cache[i][..., :C]) + p[..., S:] * new[:, None, :C]  # [B, H, C]
            o = torch.bmm(o_lat.transpose(0, 1), w["w_uv"]).transpose(0, 1).reshape(B, -1)
            x = x + o @ w["o"]
            h = self._rms(x, w["norm2"])
            x = x + (F.silu(h @ w["gate"]) * (h @ w["up"])) @ w["down"]
        return self._rms(x, self.final_norm) @ self.head, torch.stack(new_rows)


def median_ms(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


@torch.no_grad()
def run_case(model, batch: int, prompt: int, rounds: int, reps: int, compile_step: bool) -> dict:
    cfg = model.config
    S = prompt + 8
    g = torch.Generator().manual_seed(batch)
    cache = StaticKVCache(cfg, batch, S, dtype=torch.float32)
    model(torch.randint(0, cfg.vocab_size, (batch, prompt), generator=g), cache=cache, attention="dense")
    tokens = torch.randint(0, cfg.vocab_size, (batch,), generator=g)
    pos = torch.full((batch,), prompt)
    flat = FlatDecode(model, S)
    latent = cache.kv[:, :, :S].clone()  # [L, B, S, C+R]: the prompt's rows, zeros after
    rows = torch.arange(batch)

    def model_step():
        return model(tokens[:, None], positions=pos[:, None], cache=cache, attention="dense").logits[:, -1]

    def flat_step(step_fn):
        logits, new = step_fn(tokens, pos, latent)
        latent[:, rows, pos] = new  # the write the model's forward does inside
        return logits

    expected = model_step()
    torch.testing.assert_close(flat_step(flat.step), expected, rtol=1e-4, atol=1e-4)
    cases = {"model": model_step, "flat_eager": lambda: flat_step(flat.step)}
    compile_s = None
    if compile_step:
        compiled = torch.compile(flat.step, dynamic=False)
        t0 = time.perf_counter()
        torch.testing.assert_close(flat_step(compiled), expected, rtol=1e-4, atol=1e-4)
        compile_s = time.perf_counter() - t0
        cases["flat_compiled"] = lambda: flat_step(compiled)
    for fn in cases.values():  # warm-up
        median_ms(fn, 5)
    per_round = {k: [] for k in cases}
    for _ in range(rounds):
        for k, fn in cases.items():
            per_round[k].append(round(median_ms(fn, reps), 3))
    med = {k: round(statistics.median(v), 3) for k, v in per_round.items()}
    return {"bench": "decode_floor", "batch": batch, "prompt_tokens": prompt, "threads": torch.get_num_threads(),
            "median_ms": med, "rounds_ms": per_round,
            "flat_eager_over_model": round(med["flat_eager"] / med["model"], 3),
            **({"flat_compiled_over_model": round(med["flat_compiled"] / med["model"], 3),
                "compile_s": round(compile_s, 1)} if compile_step else {})}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--prompt", type=int, default=27, help="cached tokens before the step (the 16-token "
                    "GRPO step's prompts are 27 tokens)")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--reps", type=int, default=40, help="steps per round (its median is the round's time)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-compile", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    keep_freed_memory(anywhere=True)  # as the rollout actor does: its decode takes no fresh-page faults
    model = build_model(DSAConfig(**MODEL), seed=0).eval()
    for batch in args.batch:
        print(json.dumps(run_case(model, batch, args.prompt, args.rounds, args.reps, not args.no_compile)), flush=True)


if __name__ == "__main__":
    main()
