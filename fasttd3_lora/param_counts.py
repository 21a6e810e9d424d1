"""Closed-form parameter counts of one SimbaV2 categorical critic (DESIGN §1, §3, §4), and the LoRA rank whose
trainable parameters match Sparse's at a sparsity S (the paper's Figure 5 rank sweep; docs/experiments.md).

`in_dim` is the critic's input, obs_dim + act_dim; `hidden` / `blocks` the scale; `atoms` K. One critic (a twin
critic has twice each count). `tests/test_networks.py` checks the counts against built critics.
`scripts/rank_budget.py` prints the matched ranks and writes them into `configs/experiment/ablation_rank_budget.yaml`.
"""

from __future__ import annotations

import math

from fasttd3_lora.sparse import erdos_renyi_densities

__all__ = [
    "critic_matrix_shapes",
    "dense_critic_params",
    "lora_critic_trainable",
    "sparse_critic_trainable",
    "matched_lora_rank",
    "budget_rank",
]


def critic_matrix_shapes(in_dim: int, hidden: int, blocks: int, atoms: int) -> list[tuple[int, int]]:
    """(out, in) of every weight matrix (`SphericalLinear`): embedder d x (in+1) (the +1 is the c_shift input),
    per block W1 4d x d and W2 d x 4d, head d x d and K x d."""
    d = hidden
    return [(d, in_dim + 1), *[(4 * d, d), (d, 4 * d)] * blocks, (d, d), (atoms, d)]


def _vector_params(hidden: int, blocks: int, atoms: int) -> int:
    """Scalers, LERP alphas and the output bias: embedder Scaler d, per block Scaler 4d + alpha d, head Scaler d,
    bias K. Every critic kind trains all of them densely."""
    return hidden + blocks * 5 * hidden + hidden + atoms


def dense_critic_params(in_dim: int, hidden: int, blocks: int, atoms: int) -> int:
    """Parameters of the dense SimbaV2 critic (`critic=simbav2`), all trainable."""
    return sum(o * i for o, i in critic_matrix_shapes(in_dim, hidden, blocks, atoms)) + _vector_params(hidden, blocks, atoms)


def lora_critic_trainable(in_dim: int, hidden: int, blocks: int, atoms: int, rank: int) -> int:
    """Trainable parameters of the LoRA critic (`critic=lora`): the dense critic with each block matrix
    (out x in) replaced by adapters B (out x r), A (r x in), i.e. r (out + in) = 5 d r per matrix (DESIGN §3).
    The frozen W0 is a buffer; `use_base` / `base_rank` / `project` do not change the count."""
    adapted = 2 * blocks * 4 * hidden * hidden
    return dense_critic_params(in_dim, hidden, blocks, atoms) - adapted + 2 * blocks * rank * 5 * hidden


def sparse_critic_trainable(in_dim: int, hidden: int, blocks: int, atoms: int, sparsity: float) -> float:
    """Expected non-zero trainable parameters of the Sparse critic (`critic=sparse`, DESIGN §4): the Erdős–Rényi
    densities over the weight matrices (sparse.erdos_renyi_densities, the allocation the critic uses) times their
    sizes, plus the dense vectors. The masks are Bernoulli draws, so a built critic matches this in expectation."""
    shapes = critic_matrix_shapes(in_dim, hidden, blocks, atoms)
    densities = erdos_renyi_densities(shapes, sparsity)
    kept = sum(p * o * i for p, (o, i) in zip(densities, shapes, strict=True))
    return kept + _vector_params(hidden, blocks, atoms)


def matched_lora_rank(in_dim: int, hidden: int, blocks: int, atoms: int, sparsity: float) -> int | None:
    """The rank r whose `lora_critic_trainable` is nearest to `sparse_critic_trainable` at `sparsity` (ties: the
    smaller r), in [1, hidden]; None when even r = 1 has more trainable parameters than Sparse (the LoRA
    critic's dense embedder and head alone exceed Sparse's whole budget)."""
    target = sparse_critic_trainable(in_dim, hidden, blocks, atoms, sparsity)
    per_rank = 2 * blocks * 5 * hidden  # lora_critic_trainable is affine in r with this slope
    fixed = lora_critic_trainable(in_dim, hidden, blocks, atoms, 0)
    exact = (target - fixed) / per_rank
    if exact < 0.5:
        return None
    low = min(max(1, math.floor(exact)), hidden)
    high = min(low + 1, hidden)
    gap = [abs(lora_critic_trainable(in_dim, hidden, blocks, atoms, r) - target) for r in (low, high)]
    return low if gap[0] <= gap[1] else high



def budget_rank(in_dims: list[int], hidden: int, blocks: int, atoms: int, sparsity: float) -> int | None:
    """One rank for several tasks (critic inputs `in_dims`): the r in [1, hidden] with the smallest worst-case
    relative gap |LoRA(r) - Sparse(S)| / Sparse(S) over the tasks (ties: the smaller r). The embedder's width
    depends on the task, so the exact match does too (`matched_lora_rank`); a sweep needs one value per S.
    None when some task has no matching rank at all."""
    if not in_dims:
        raise ValueError("in_dims must name at least one task's critic input size, got an empty list")
    matched = [matched_lora_rank(i, hidden, blocks, atoms, sparsity) for i in in_dims]
    if any(r is None for r in matched):
        return None
    targets = [sparse_critic_trainable(i, hidden, blocks, atoms, sparsity) for i in in_dims]

    def worst(rank: int) -> float:
        return max(abs(lora_critic_trainable(i, hidden, blocks, atoms, rank) - t) / t for i, t in zip(in_dims, targets))

    return min(range(min(matched), max(matched) + 1), key=lambda r: (worst(r), r))
