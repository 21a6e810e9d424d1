"""Critics and actors built from SimbaV2 blocks (DESIGN §1-§4), target networks and optimiser groups.

Critics are always a stacked ensemble (`num_critics` = E = 1 or 2): one pass returns logits (E, N, K).
The LoRA critic puts `SphericalLoRALinear` only on the block matrices W1, W2 (DESIGN §3); its target is a dense
copy (`dense_target`) updated with the EMA of the effective weights (`polyak_update_`). Optimiser groups, targets
and Polyak averaging see adapted layers only through the adapter contract (`fasttd3_lora.adapters.AdapterLayer`).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import math
from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fasttd3_lora.distributional import expected_value, make_atoms
from fasttd3_lora.hypersphere import SphericalLinear, check_positive_int
from fasttd3_lora.adapters import AdapterLayer, adapter_parameters
from fasttd3_lora.lora import SphericalLoRALinear
from fasttd3_lora.simbav2 import Block, Head, LinearFactory, SimbaV2Encoder
from fasttd3_lora.sparse import apply_sparsity_

__all__ = [
    "CRITIC_KINDS",
    "LORA_OPTIONS",
    "LOG_STD_MIN",
    "LOG_STD_MAX",
    "CategoricalCritic",
    "TanhGaussianActor",
    "DeterministicActor",
    "bounded_log_std",
    "tanh_gaussian_sample",
    "make_critic",
    "dense_target",
    "polyak_update_",
    "lora_parameters",
    "non_lora_parameters",
    "optimizer_groups",
    "convert_blocks_to_lora_",
    "CriticSettings",
]

CRITIC_KINDS = ("simbav2", "sparse", "lora")
# Keyword arguments of SphericalLoRALinear a `lora` config may set (optimiser settings such as weight decay live elsewhere).
LORA_OPTIONS = ("rank", "alpha", "base_init_scale", "project", "use_base", "base_rank")
LOG_STD_MIN = -10.0  # SAC actor log-std range [-10, 2] (DESIGN §1)
LOG_STD_MAX = 2.0


def lora_parameters(net: nn.Module) -> list[nn.Parameter]:
    """The factors (A, B) of every adapted layer in `net`: the LoRA optimiser group."""
    return adapter_parameters(net)


def non_lora_parameters(net: nn.Module) -> list[nn.Parameter]:
    """Every parameter of `net` that is not a LoRA adapter (the frozen base is a buffer, never a parameter)."""
    adapters = {id(p) for p in lora_parameters(net)}
    return [p for p in net.parameters() if id(p) not in adapters]


def optimizer_groups(net: nn.Module, lora_weight_decay: float) -> list[dict[str, Any]]:
    """AdamW parameter groups (DESIGN §3): everything but the LoRA adapters without weight decay, then, if `net`
    has adapters, A and B with `lora_weight_decay`. Both groups take the optimiser's learning rate."""
    groups: list[dict[str, Any]] = [{"params": non_lora_parameters(net), "weight_decay": 0.0}]
    adapters = lora_parameters(net)
    if adapters:
        groups.append({"params": adapters, "weight_decay": lora_weight_decay})
    return groups


class CategoricalCritic(nn.Module):
    """`concat(obs_normalised, action)` -> SimbaV2Encoder -> Head -> K logits, stacked over `num_critics`."""

    def __init__(
        self,
        obs_dim: int,
        act_dim: int,
        hidden_dim: int,
        num_blocks: int,
        num_atoms: int,
        v_min: float,
        v_max: float,
        num_critics: int = 1,
        block_linear: LinearFactory = SphericalLinear,
    ) -> None:
        super().__init__()
        check_positive_int("obs_dim", obs_dim)
        check_positive_int("act_dim", act_dim)
        if num_critics not in (1, 2):
            raise ValueError(f"num_critics must be 1 or 2, got {num_critics!r}")
        self.num_critics = num_critics
        self.encoder = SimbaV2Encoder(obs_dim + act_dim, hidden_dim, num_blocks, block_linear, ensemble=num_critics)
        self.head = Head(hidden_dim, num_atoms, ensemble=num_critics)
        self.register_buffer("atoms", make_atoms(v_min, v_max, num_atoms))

    def forward(self, obs: Tensor, action: Tensor) -> Tensor:
        """obs (N, obs_dim), action (N, act_dim) -> logits (E, N, K); the input is shared by the E critics."""
        return self.head(self.encoder(torch.cat([obs, action], dim=-1)))

    def q_value(self, logits: Tensor) -> Tensor:
        """Expected value over the atoms: (E, N, K) -> (E, N)."""
        return expected_value(logits, self.atoms)

    def lora_parameters(self) -> list[nn.Parameter]:
        return lora_parameters(self)

    def base_parameters(self) -> list[nn.Parameter]:
        return non_lora_parameters(self)


def bounded_log_std(raw: Tensor) -> Tensor:
    """`log_std = -10 + 6 (1 + tanh(raw))`, i.e. squashed into [LOG_STD_MIN, LOG_STD_MAX] (DESIGN §1)."""
    return LOG_STD_MIN + 0.5 * (LOG_STD_MAX - LOG_STD_MIN) * (1.0 + torch.tanh(raw))


def tanh_gaussian_sample(mean: Tensor, log_std: Tensor, noise: Tensor) -> tuple[Tensor, Tensor]:
    """Reparameterised `a = tanh(mean + std * noise)` and `log pi(a)` summed over the last axis.

    The tanh log-det uses `log(1 - tanh(u)^2) = 2 (log 2 - u - softplus(-2u))`, finite even where tanh(u)
    rounds to +-1.
    """
    u = mean + torch.exp(log_std) * noise
    gaussian = -0.5 * noise.pow(2) - log_std - 0.5 * math.log(2.0 * math.pi)
    log_det = 2.0 * (math.log(2.0) - u - F.softplus(-2.0 * u))
    return torch.tanh(u), (gaussian - log_det).sum(-1)


class TanhGaussianActor(nn.Module):
    """SAC actor: SimbaV2 encoder, two heads (mean, raw log-std), tanh-squashed Gaussian (DESIGN §1)."""

    def __init__(self, obs_dim: int, act_dim: int, hidden_dim: int, num_blocks: int) -> None:
        super().__init__()
        self.encoder = SimbaV2Encoder(obs_dim, hidden_dim, num_blocks)
        self.mean_head = Head(hidden_dim, act_dim)
        self.log_std_head = Head(hidden_dim, act_dim)

    def forward(self, obs: Tensor, noise: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Reparameterised sample: obs (N, obs_dim) -> (action (N, act_dim) in (-1, 1), log_prob (N,)).

        `noise` (N, act_dim) standard normal lets the caller own the randomness (an agent draws it from its own
        generator, so updates are reproducible and compiled code holds no RNG state); None draws it here.
        The sampling math is float32 even under bf16 autocast: bf16 log-probs are too coarse.
        """
        h = self.encoder(obs)
        mean = self.mean_head(h).float()
        log_std = bounded_log_std(self.log_std_head(h).float())
        return tanh_gaussian_sample(mean, log_std, torch.randn_like(mean) if noise is None else noise)

    def deterministic_action(self, obs: Tensor) -> Tensor:
        """Evaluation / export action `tanh(mean)`."""
        return torch.tanh(self.mean_head(self.encoder(obs)))


class DeterministicActor(nn.Module):
    """TD3 actor: SimbaV2 encoder and one head, `tanh` output."""

    def __init__(self, obs_dim: int, act_dim: int, hidden_dim: int, num_blocks: int) -> None:
        super().__init__()
        self.encoder = SimbaV2Encoder(obs_dim, hidden_dim, num_blocks)
        self.head = Head(hidden_dim, act_dim)

    def forward(self, obs: Tensor) -> Tensor:
        return torch.tanh(self.head(self.encoder(obs)))

    def deterministic_action(self, obs: Tensor) -> Tensor:
        """Same as `forward` (exploration noise is added by the agent); named like TanhGaussianActor's for export."""
        return self(obs)


def make_critic(
    kind: str,
    obs_dim: int,
    act_dim: int,
    hidden_dim: int,
    num_blocks: int,
    num_atoms: int,
    v_min: float,
    v_max: float,
    num_critics: int = 1,
    lora: Mapping[str, object] | None = None,
    sparsity: float | None = None,
    generator: torch.Generator | None = None,
) -> CategoricalCritic:
    """Build a categorical critic of `kind` "simbav2" (dense), "sparse" (ER masks at `sparsity`, drawn with
    `generator`, None = global RNG) or "lora" (SphericalLoRALinear on block W1/W2, keyword arguments from `lora`, keys in
    LORA_OPTIONS). Weight init uses torch's global RNG. Settings of another kind are an error, not ignored."""
    if kind not in CRITIC_KINDS:
        raise ValueError(f"kind must be one of {CRITIC_KINDS}, got {kind!r}")
    if kind != "lora" and lora is not None:
        raise ValueError(f"lora settings are only for kind='lora', got kind={kind!r} with lora={dict(lora)!r}")
    if kind != "sparse" and sparsity is not None:
        raise ValueError(f"sparsity is only for kind='sparse', got kind={kind!r} with sparsity={sparsity!r}")
    block_linear: LinearFactory = SphericalLinear
    if kind == "lora":
        options = dict(lora or {})
        unknown = sorted(set(options) - set(LORA_OPTIONS))
        if unknown:
            raise ValueError(f"unknown lora settings {unknown}; allowed: {list(LORA_OPTIONS)}")
        block_linear = functools.partial(SphericalLoRALinear, **options)
    critic = CategoricalCritic(
        obs_dim, act_dim, hidden_dim, num_blocks, num_atoms, v_min, v_max, num_critics, block_linear
    )
    if kind == "sparse":
        if sparsity is None:
            raise ValueError("kind='sparse' needs sparsity in [0, 1), got None")
        apply_sparsity_(critic, sparsity, generator)
    return critic


def _replace_children_(net: nn.Module, kind: type[nn.Module], convert: Callable[[nn.Module], nn.Module]) -> int:
    """Replace every child module of type `kind` (at any depth) by `convert(child)`; returns how many."""
    count = 0
    for parent in list(net.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, kind):
                setattr(parent, name, convert(child))
                count += 1
    return count


def dense_target(critic: nn.Module) -> nn.Module:
    """Target network: a copy of `critic` in which every adapted layer is its `dense_copy()` (the critic's: a
    `SphericalLinear` holding its `effective_weight()`); nothing in it requires grad. It is updated by
    `polyak_update_` and never projected."""
    target = copy.deepcopy(critic)
    _replace_children_(target, AdapterLayer, lambda layer: layer.dense_copy())
    return target.requires_grad_(False)


@torch.no_grad()
def polyak_update_(target: nn.Module, online: nn.Module, tau: float) -> None:
    """`target <- tau * online + (1 - tau) * target`, where a LoRA layer of `online` contributes its effective
    weight `W0 + s B A` (DESIGN §3). Buffers (atoms, masks) are not touched; the target is not re-projected."""
    if not 0.0 < tau <= 1.0:
        raise ValueError(f"tau must be in (0, 1], got {tau!r}")
    target_modules, online_modules = list(target.modules()), list(online.modules())
    if len(target_modules) != len(online_modules):
        raise ValueError(
            f"target has {len(target_modules)} modules, online {len(online_modules)}: not the same architecture"
        )
    destinations: list[Tensor] = []
    sources: list[Tensor] = []
    for t, o in zip(target_modules, online_modules):
        if isinstance(o, AdapterLayer):
            if not isinstance(getattr(t, "weight", None), Tensor) or isinstance(t, AdapterLayer):
                raise ValueError(f"an adapted layer's target must be a dense layer, got {type(t).__name__}")
            destinations.append(t.weight)
            sources.append(o.effective_weight())
            continue
        if type(t) is not type(o):
            raise ValueError(f"module types differ: target {type(t).__name__}, online {type(o).__name__}")
        for tp, op in zip(t.parameters(recurse=False), o.parameters(recurse=False), strict=True):
            destinations.append(tp)
            sources.append(op)
    # The literal tau*W + (1-tau)*W_t (not lerp), so the update is bit-for-bit the formula of DESIGN §3.
    torch._foreach_mul_(destinations, 1.0 - tau)
    torch._foreach_add_(destinations, torch._foreach_mul(sources, tau))


def convert_blocks_to_lora_(
    net: nn.Module,
    rank: int = 96,
    alpha: float = 96.0,
    base_init_scale: float = 0.5,
    *,
    project: bool = True,
) -> int:
    """Dense warm-up (paper Figure 4): every dense matrix of every SimbaV2 `Block` in `net` becomes
    `SphericalLoRALinear.from_dense` (its current weight, rescaled rows, frozen). Embedder and heads stay dense.
    Returns the number of converted matrices; rebuild the optimiser (and keep the target as it is) afterwards."""
    count = 0
    for block in [m for m in net.modules() if isinstance(m, Block)]:
        count += _replace_children_(
            block,
            SphericalLinear,
            lambda layer: SphericalLoRALinear.from_dense(layer, rank, alpha, base_init_scale, project=project),
        )
    return count


def _optional(group: Any, key: str, cast: Callable[[Any], Any]) -> Any:
    """`cast(group[key])`, or None when the key is absent or null (the dense critic group has no LoRA keys)."""
    value = group.get(key, None) if hasattr(group, "get") else getattr(group, key, None)
    return None if value is None else cast(value)


@dataclasses.dataclass(frozen=True)
class CriticSettings:
    """Which critic an agent builds: the `critic/` and `scale/` Hydra groups, shared by the agents' configs.

    Field names are the Hydra keys: `critic.kind` as `critic_kind`; `critic.rank`, `alpha`, `base_init_scale`,
    `project`, `use_base`, `base_rank` as `lora_*`; `critic.warmup_fraction`; `scale.*` verbatim. The lora_*
    fields and warmup_fraction are None for the dense and sparse critics. Subclasses (SACConfig, FastTD3Config)
    add their algorithm's fields and call `super().__post_init__()`.
    """

    critic_kind: str
    lora_rank: int | None
    lora_alpha: float | None
    lora_base_init_scale: float | None
    lora_project: bool | None
    lora_use_base: bool | None
    lora_base_rank: int | None
    warmup_fraction: float | None
    critic_hidden_dim: int
    critic_num_blocks: int
    sparsity: float

    def __post_init__(self) -> None:
        name = type(self).__name__
        for field in ("critic_hidden_dim", "critic_num_blocks"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}.{field} must be a positive int, got {value!r}")
        if self.critic_kind not in CRITIC_KINDS:
            raise ValueError(f"{name}.critic_kind must be one of {CRITIC_KINDS}, got {self.critic_kind!r}")
        lora_fields = ("lora_rank", "lora_alpha", "lora_base_init_scale", "lora_project", "lora_use_base",
                       "warmup_fraction")  # fmt: skip
        if self.critic_kind == "lora":
            unset = [field for field in lora_fields if getattr(self, field) is None]
            if unset:
                raise ValueError(f"{name}: critic_kind 'lora' needs {unset} set, got None")
            if not 0.0 <= self.warmup_fraction < 1.0:
                raise ValueError(f"{name}.warmup_fraction must be in [0, 1), got {self.warmup_fraction!r}")
            if self.warmup_fraction > 0 and (not self.lora_use_base or self.lora_base_rank is not None):
                raise ValueError(
                    f"{name}: dense warm-up (warmup_fraction={self.warmup_fraction!r}) freezes the warmed-up "
                    f"weights as a full-rank W0, so it needs lora_use_base=True and lora_base_rank=None, got "
                    f"{self.lora_use_base!r} and {self.lora_base_rank!r}"
                )
        else:
            set_ = [field for field in lora_fields + ("lora_base_rank",) if getattr(self, field) is not None]
            if self.warmup_fraction == 0.0:  # "no warm-up" is a fine thing to say of any critic
                set_.remove("warmup_fraction")
            if set_:
                raise ValueError(f"{name}: {set_} only apply to critic_kind 'lora', got {self.critic_kind!r}")
        if not 0.0 <= self.sparsity < 1.0:
            raise ValueError(f"{name}.sparsity must be in [0, 1), got {self.sparsity!r}")

    @staticmethod
    def hydra_fields(cfg: Any) -> dict[str, Any]:
        """The CriticSettings fields from a composed config's `critic` and `scale` groups."""
        critic, scale = cfg.critic, cfg.scale
        return dict(
            critic_kind=str(critic.kind),
            lora_rank=_optional(critic, "rank", int),
            lora_alpha=_optional(critic, "alpha", float),
            lora_base_init_scale=_optional(critic, "base_init_scale", float),
            lora_project=_optional(critic, "project", bool),
            lora_use_base=_optional(critic, "use_base", bool),
            lora_base_rank=_optional(critic, "base_rank", int),
            warmup_fraction=_optional(critic, "warmup_fraction", float),
            critic_hidden_dim=int(scale.critic_hidden_dim),
            critic_num_blocks=int(scale.critic_num_blocks),
            sparsity=float(scale.sparsity),
        )

    def lora_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of `SphericalLoRALinear` (`make_critic(..., lora=...)`)."""
        return dict(
            rank=self.lora_rank,
            alpha=self.lora_alpha,
            base_init_scale=self.lora_base_init_scale,
            project=self.lora_project,
            use_base=self.lora_use_base,
            base_rank=self.lora_base_rank,
        )

    def make_critic(
        self,
        obs_dim: int,
        act_dim: int,
        num_atoms: int,
        v_min: float,
        v_max: float,
        num_critics: int,
        kind: str | None = None,
    ) -> CategoricalCritic:
        """`make_critic` with these settings; `kind` overrides `critic_kind` (a dense critic during warm-up)."""
        kind = self.critic_kind if kind is None else kind
        return make_critic(
            kind, obs_dim, act_dim, self.critic_hidden_dim, self.critic_num_blocks, num_atoms, v_min, v_max,
            num_critics,
            lora=self.lora_kwargs() if kind == "lora" else None,
            sparsity=self.sparsity if kind == "sparse" else None,
        )  # fmt: skip
