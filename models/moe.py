"""DeepSeek-V3 Mixture of Experts: shared experts plus routed experts chosen by a sigmoid router.

    s = sigmoid(W_g x)                                    fp32 affinities, one per routed expert  [N, E]
    c = s + b                                             b: e_score_correction_bias (choice only)
    group score = sum of the 2 best c in each of n_group groups; keep the topk_group best groups
    experts = top-k of c within the kept groups          k = num_experts_per_tok
    g = s[experts] (/ sum, if norm_topk_prob) * routed_scaling_factor
    y = sum_shared SwiGLU(x) + sum_{e in experts} g_e SwiGLU_e(x)
The bias b only steers the choice (DeepSeek-V3's auxiliary-loss-free balancing); it is a buffer, never a
parameter, so RL leaves it frozen. Router weight and bias stay fp32 (their scores decide a discrete
choice). Routed compute is grouped by expert: the (token, slot) pairs are sorted by expert and each
expert runs one matmul over all its tokens. Routing can be replayed: given expert ids ("keep routing",
DeepSeek-V3.2 section 3.1), the router only recomputes their weights, so it still gets a gradient.
Weight names follow the Hugging Face checkpoints: mlp.gate.{weight, e_score_correction_bias},
mlp.shared_experts.{gate,up,down}_proj, mlp.experts.{i}.{gate,up,down}_proj.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from .layers import SwiGLU


class TopkRouter(nn.Module):
    def __init__(self, hidden_size: int, n_experts: int, top_k: int, n_group: int, topk_group: int,
                 norm_topk_prob: bool, scaling: float):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_experts, hidden_size, dtype=torch.float32))
        self.register_buffer("e_score_correction_bias", torch.zeros(n_experts, dtype=torch.float32))
        self.top_k, self.n_group, self.topk_group = top_k, n_group, topk_group
        self.norm_topk_prob, self.scaling = norm_topk_prob, scaling

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """x [N, hidden] -> sigmoid affinities [N, E] fp32."""
        return F.linear(x.float(), self.weight.float()).sigmoid()  # fp32: the scores decide a discrete choice

    def choose(self, scores: torch.Tensor) -> torch.Tensor:
        """scores [N, E] -> chosen experts [N, k] (group-limited top-k of scores + bias)."""
        choice = scores + self.e_score_correction_bias.float()  # [N, E]
        if self.n_group > 1:
            N, E = choice.shape
            grouped = choice.view(N, self.n_group, E // self.n_group)  # [N, G, E/G]
            group_score = grouped.topk(2, dim=-1).values.sum(-1)  # [N, G]
            keep = group_score.topk(self.topk_group, dim=-1).indices  # [N, topk_group]
            masked = torch.ones_like(group_score, dtype=torch.bool).scatter_(1, keep, False)  # [N, G] True = dropped
            choice = grouped.masked_fill(masked[..., None], float("-inf")).view(N, E)
        return choice.topk(self.top_k, dim=-1).indices  # [N, k]

    def forward(self, x: torch.Tensor, experts: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x [N, hidden], optional replayed experts [N, k] -> (weights [N, k] fp32, experts [N, k] int64)."""
        scores = self.scores(x)
        if experts is None:
            with torch.no_grad():
                experts = self.choose(scores)
        experts = experts.long()
        weights = scores.gather(1, experts)  # [N, k]: the bias never weighs an expert's output
        if self.norm_topk_prob:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        return weights * self.scaling, experts


def grouped_expert_forward(x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor,
                           modules: nn.ModuleList) -> torch.Tensor:
    """sum_j weights[n, j] * modules[experts[n, j]](x[n]) for x [N, hidden], weights/experts [N, k] -> [N, hidden].

    One matmul chain per expert over every (token, slot) routed to it, not a loop over tokens."""
    N, k = experts.shape
    flat = experts.reshape(-1)  # [N*k]
    order = flat.argsort(stable=True)  # (token, slot) pairs grouped by expert
    token = order // k  # [N*k] source token of each sorted pair
    counts = torch.bincount(flat, minlength=len(modules)).tolist()  # one host sync per layer
    xs = x[token]  # [N*k, hidden], contiguous runs per expert
    outs, start = [], 0
    for e, n in enumerate(counts):
        if n:
            outs.append(modules[e](xs[start:start + n]))
            start += n
    if not outs:  # no tokens
        return torch.zeros_like(x)
    ys = torch.cat(outs) * weights.reshape(-1)[order, None].to(x.dtype)  # [N*k, hidden]
    return x.new_zeros(N, x.shape[-1]).index_add_(0, token, ys)


class MoE(nn.Module):
    def __init__(self, hidden_size: int, moe_intermediate_size: int, n_experts: int, n_shared: int, top_k: int,
                 n_group: int, topk_group: int, norm_topk_prob: bool, scaling: float):
        super().__init__()
        self.gate = TopkRouter(hidden_size, n_experts, top_k, n_group, topk_group, norm_topk_prob, scaling)
        self.experts = nn.ModuleList(SwiGLU(hidden_size, moe_intermediate_size) for _ in range(n_experts))
        self.shared_experts = SwiGLU(hidden_size, moe_intermediate_size * n_shared) if n_shared else None

    def forward(self, x: torch.Tensor, experts: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, T, hidden], optional replayed experts [B, T, k] -> (y [B, T, hidden], experts [B, T, k])."""
        B, T, D = x.shape
        flat = x.reshape(B * T, D)
        weights, chosen = self.gate(flat, None if experts is None else experts.reshape(B * T, -1))
        y = grouped_expert_forward(flat, weights, chosen, self.experts).view(B, T, D)
        if self.shared_experts is not None:
            y = y + self.shared_experts(x)
        return y, chosen.view(B, T, chosen.shape[-1])  # T may be 0 (a KV-only last layer)
