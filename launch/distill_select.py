"""The distillation's choices, each a plain function of validation accuracies (never held-out rows).

    choose_teachers   which specialist(s) teach each domain in on-policy distillation
    gap_weights       each domain's share of the on-policy prompts, from the student's validation gap
    selection_score   how good a student state is (the goal: no domain far below its teacher)
    BestState         keeps the best-scoring student weights and stops after `patience` evals without gain

The pipeline (launch/distill_pipeline.py) measures accuracies on each domain's validation rows
(data/domains.py `validation_rows`, disjoint from train and held-out rows) and passes only those here;
tests replace the held-out rows by garbage and check that every choice stays the same.
"""
import copy
import math
from dataclasses import dataclass, field


def choose_teachers(val_acc: dict[str, dict[str, float]], rule: str, margin: float = 0.0) -> dict[str, list[str]]:
    """Teachers per domain. `val_acc[specialist][domain]`: greedy validation accuracy.

    own         each domain's own specialist (the specialists trained on the other domains are ignored,
                even where they are as good on this domain).
    validation  every specialist within `margin` of the best one on the domain's validation rows; the
                domain's own specialist first when it qualifies (its student then mixes them, see
                TeacherPool.mixture_log_probs). margin 0: the best one(s) only."""
    domains = list(val_acc)
    if rule == "own":
        return {d: [d] for d in domains}
    if rule != "validation":
        raise ValueError(f"opd.teacher must be 'own' or 'validation', got {rule!r}")
    if margin < 0:
        raise ValueError(f"opd.teacher_margin must be >= 0, got {margin}")
    out = {}
    for d in domains:
        best = max(val_acc[s][d] for s in domains)
        picked = [s for s in domains if val_acc[s][d] >= best - margin - 1e-9]
        out[d] = sorted(picked, key=lambda s: (s != d, domains.index(s)))
    return out


def teacher_accuracy(val_acc: dict[str, dict[str, float]], teachers: dict[str, list[str]]) -> dict[str, float]:
    """The bar per domain: the best validation accuracy among its teachers."""
    return {d: max(val_acc[s][d] for s in ts) for d, ts in teachers.items()}


def gap_weights(target: dict[str, float], student: dict[str, float], floor: float) -> dict[str, float]:
    """Prompts where the student trails most: weight = floor + max(0, target - student) per domain.
    The floor keeps every domain in each batch, so a domain at its target is still held there."""
    if floor <= 0:
        raise ValueError(f"opd.weight_floor must be > 0, got {floor}")
    return {d: floor + max(0.0, target[d] - student[d]) for d in target}


def selection_score(student: dict[str, float], target: dict[str, float]) -> tuple[float, float]:
    """(worst domain's gap to its target, mean gap): higher is better; the goal is a bound on the worst."""
    gaps = [student[d] - target[d] for d in target]
    return min(gaps), sum(gaps) / len(gaps)


@dataclass
class BestState:
    """The best student weights seen at validation evals, and whether to stop (no gain in `patience` evals)."""

    patience: int  # 0: never stop early
    score: tuple[float, float] = (-math.inf, -math.inf)
    step: int = -1
    state: dict | None = field(default=None, repr=False)
    evals_since_best: int = 0

    def update(self, step: int, score: tuple[float, float], model) -> bool:
        """Record one eval; True when the run should stop here."""
        if score > self.score:
            self.score, self.step, self.evals_since_best = score, step, 0
            self.state = copy.deepcopy(model.state_dict())
        else:
            self.evals_since_best += 1
        return self.patience > 0 and self.evals_since_best >= self.patience
