"""Hyperspherical LoRA layer of the critic's block matrices (DESIGN §3, paper Eqs. 11-15 and the §7 ablations).

`W = W0 + s B A` with `s = alpha / r`, a frozen buffer `W0` (rows of squared norm `base_init_scale`, Eq. 14) and
trainable adapters `A (r x in)`, `B (out x r)`, both N(0, 1/r) (Eq. 15). After init and after every optimiser
step, `project_()` rescales each row of `B` by the positive root `c_i` of `||w0_i + c_i dw_i|| = 1`
(Eqs. 11-13), so the effective rows are unit norm while `W0` is never touched, and keeps
`W_eff = W0 + diag(c) s B A` from the same product as the buffer `w_eff` (the dense forward and the target
critic use it; it is saved with the model).

The projection's math is in pure functions (`fasttd3_lora.lora_projection`: Eq. 13 is `positive_root`), which
the fused kernel (`fasttd3_lora.kernels.lora_weight`) replaces; `s B A` and the adapter contract (`AdapterLayer`:
frozen `base`, trainable `lora_A` / `lora_B`, `effective_weight()`) are those of the general adapters
(`fasttd3_lora.adapters`), of which this layer is the hyperspherical variant.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from fasttd3_lora.adapters import AdapterLayer, check_rank_alpha, lora_delta
from fasttd3_lora.hypersphere import Projected, SphericalLinear, check_ensemble, check_positive_int, linear
from fasttd3_lora.kernels import cached_lora_weight, lora_weight

__all__ = ["frozen_base", "SphericalLoRALinear"]

def _check_open_unit(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and not isinstance(value, bool) and 0.0 < value < 1.0):
        raise ValueError(f"{name} must be in the open interval (0, 1), got {value!r}")


@torch.no_grad()
def frozen_base(
    out_features: int,
    in_features: int,
    base_init_scale: float,
    *,
    ensemble: int | None = None,
    base_rank: int | None = None,
) -> Tensor:
    """Frozen base W0 (Eq. 14): orthogonal, rows rescaled to `||w0_i||^2 = base_init_scale`.

    With `base_rank=k` the matrix is `Q_out Q_in^T` with orthonormal (out x k) and (in x k) factors (rank k,
    all singular values equal before the row rescale), then rows are rescaled the same way.
    """
    _check_open_unit("base_init_scale", base_init_scale)
    members = 1 if ensemble is None else ensemble
    base = torch.empty(members, out_features, in_features)
    for member in base:
        if base_rank is None:
            nn.init.orthogonal_(member)
        else:
            q_out = nn.init.orthogonal_(torch.empty(out_features, base_rank))
            q_in = nn.init.orthogonal_(torch.empty(in_features, base_rank))
            member.copy_(q_out @ q_in.T)
    base = _rescale_rows(base, base_init_scale)
    return base[0] if ensemble is None else base


def _rescale_rows(weight: Tensor, base_init_scale: float) -> Tensor:
    """Rows scaled to norm sqrt(base_init_scale) (Eq. 14)."""
    norms = torch.linalg.vector_norm(weight, dim=-1, keepdim=True).clamp_min(1e-8)
    return weight * (math.sqrt(base_init_scale) / norms)


class SphericalLoRALinear(Projected, AdapterLayer):
    """Bias-free linear layer `W = W0 + (alpha/r) B A` with hyperspherical projection of `B` (DESIGN §3).

    Switches for the paper's §7 ablations: `project=False` is LoRA-NoWN (`project_()` leaves B as it is);
    `use_base=False` is NoBase (`W = s B A`, i.e. W0 = 0, projected with the same root at g = 1);
    `base_rank=k` gives a rank-k frozen base. `base` is a buffer: never in an optimiser, never changed.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int = 96,
        alpha: float = 96.0,
        base_init_scale: float = 0.5,
        *,
        ensemble: int | None = None,
        project: bool = True,
        use_base: bool = True,
        base_rank: int | None = None,
    ) -> None:
        super().__init__()
        check_positive_int("in_features", in_features)
        check_positive_int("out_features", out_features)
        check_ensemble(ensemble)
        full = min(in_features, out_features)
        check_rank_alpha(rank, alpha, full)
        _check_open_unit("base_init_scale", base_init_scale)
        if base_rank is not None:
            if not use_base:
                raise ValueError(f"base_rank={base_rank!r} needs use_base=True (NoBase has no W0)")
            if isinstance(base_rank, bool) or not isinstance(base_rank, int) or not 1 <= base_rank < full:
                raise ValueError(f"base_rank must be None or an int in [1, min(in, out)) = [1, {full}), got {base_rank!r}")
        self.in_features = in_features
        self.out_features = out_features
        self.rank = rank
        self.alpha = float(alpha)
        self.scale = self.alpha / rank
        self.base_init_scale = float(base_init_scale)
        self.ensemble = ensemble
        self.project = bool(project)
        self.use_base = bool(use_base)
        self.base_rank = base_rank

        lead = () if ensemble is None else (ensemble,)
        if use_base:
            base = frozen_base(out_features, in_features, base_init_scale, ensemble=ensemble, base_rank=base_rank)
        else:
            base = torch.zeros(*lead, out_features, in_features)
        self.register_buffer("base", base)
        self.lora_A = nn.Parameter(torch.empty(*lead, rank, in_features))
        self.lora_B = nn.Parameter(torch.empty(*lead, out_features, rank))
        # W0 + diag(c) ΔW from the last project_(): state, saved with the model, because it equals W0 + s B A
        # only up to rounding (one product per projection instead of two). Used while `_w_eff_key` matches.
        self.register_buffer("w_eff", torch.empty_like(base))
        self._w_eff_key: tuple[int, ...] | None = None
        self.reset_adapters_()

    @torch.no_grad()
    def reset_adapters_(self) -> None:
        """Fresh adapters A, B ~ N(0, 1/r) (Eq. 15; never B = 0, where the projection is degenerate), projected."""
        std = 1.0 / math.sqrt(self.rank)
        nn.init.normal_(self.lora_A, std=std)
        nn.init.normal_(self.lora_B, std=std)
        self.project_()

    @classmethod
    def from_dense(
        cls,
        layer: SphericalLinear,
        rank: int = 96,
        alpha: float = 96.0,
        base_init_scale: float = 0.5,
        *,
        project: bool = True,
    ) -> "SphericalLoRALinear":
        """Dense warm-up conversion (paper Figure 4): W0 := the layer's current weight with rows rescaled to
        `||w0_i||^2 = base_init_scale`; fresh adapters, projected. Same device as `layer`."""
        if not isinstance(layer, SphericalLinear):
            raise ValueError(f"from_dense expects a SphericalLinear, got {type(layer).__name__}")
        weight = layer.effective_weight().detach()
        new = cls(
            layer.in_features,
            layer.out_features,
            rank,
            alpha,
            base_init_scale,
            ensemble=layer.ensemble,
            project=project,
        ).to(weight.device)
        new.base.copy_(_rescale_rows(weight.float(), base_init_scale))
        new.reset_adapters_()
        return new

    def delta_weight(self) -> Tensor:
        """`s B A` with the current (already projected) B."""
        return lora_delta(self.lora_A, self.lora_B, self.scale)

    def effective_weight(self) -> Tensor:
        """`W0 + s B A`, differentiable in A and B: in eager mode the `w_eff` buffer written by the last
        `project_()` (or loaded with it) while W0, A, B are unchanged since (read-only: do not modify it in
        place); otherwise (stale, or under torch.compile, which cannot guard on `_version`) computed by the
        fused op from the current A, B. The two agree to rounding (~1e-7 relative in fp32)."""
        if not torch.compiler.is_compiling() and self._w_eff_key == self._cache_key():
            return cached_lora_weight(self.w_eff, self.lora_A, self.lora_B, self.scale)
        return lora_weight(self.base, self.lora_A, self.lora_B, self.scale, project=False)[0]

    @torch.no_grad()
    def dense_copy(self) -> SphericalLinear:
        """A `SphericalLinear` holding `effective_weight()` (the target critic's layer; never projected)."""
        weight = self.effective_weight()
        dense = SphericalLinear(self.in_features, self.out_features, ensemble=self.ensemble).to(weight.device)
        dense.weight.copy_(weight)
        return dense

    def forward(self, x: Tensor) -> Tensor:
        # Rows of x per ensemble member decide the cheaper form (DESIGN §3): the factored form costs
        # N r (in + out) extra, the dense one r in out, so dense wins when N > in*out/(in+out). (Counting the
        # backward too moves the crossover to ~700 rows at 512x2048, r=96; SAC's 256 and FastTD3's 8192 fall on
        # the same side either way.)
        rows = x.shape[-2] if self.ensemble is not None and x.dim() >= 2 else x[..., 0].numel()
        if rows > self.in_features * self.out_features / (self.in_features + self.out_features):
            return linear(x, self.effective_weight())
        low_rank = self.scale * linear(linear(x, self.lora_A), self.lora_B)
        return linear(x, self.base) + low_rank if self.use_base else low_rank

    def _cache_key(self) -> tuple[int, ...]:
        """Changes whenever W0, A, B or W_eff change in place (optimiser step, load_state_dict) or are replaced
        (.to())."""
        tensors = (self.base, self.lora_A, self.lora_B, self.w_eff)
        return tuple(v for t in tensors for v in (t._version, t.data_ptr()))

    @torch.no_grad()
    def project_(self) -> None:
        """`B_i <- c_i B_i` (Eqs. 11-13; skipped for LoRA-NoWN) and `w_eff = W0 + diag(c) s B A` refreshed, in one
        fused call (`fasttd3_lora.kernels.lora_weight`; its reference keeps the root in fp32 under autocast).
        W0 untouched."""
        # In place: W_eff's memory is reused every step (a graph still holding the old W_eff would fail its
        # backward on the version check, never read the new values).
        lora_weight(self.base, self.lora_A, self.lora_B, self.scale, project=self.project, out=self.w_eff)
        self._w_eff_key = self._cache_key()

    def __getstate__(self) -> dict:
        # Copies (deepcopy, pickle) get new tensors with new version counters: carry "w_eff is current" over
        # as a flag, so a copy serves the same W_eff as the original instead of a recomputation (~1e-7 off).
        state = super().__getstate__()
        state["_w_eff_key"] = self._w_eff_key == self._cache_key()
        return state

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self._w_eff_key = self._cache_key() if self._w_eff_key is True else None

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:  # noqa: ANN001 (nn.Module's signature)  # fmt: skip
        """A loaded `w_eff` is current for the loaded A, B; a state dict from before it was saved gets it
        recomputed as `W0 + s B A` (not re-projected: B stays as saved)."""
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)  # fmt: skip
        if prefix + "w_eff" in missing_keys:
            missing_keys.remove(prefix + "w_eff")
            with torch.no_grad():  # the same in-place refresh as project_(), without the projection
                lora_weight(self.base, self.lora_A, self.lora_B, self.scale, project=False, out=self.w_eff)
        self._w_eff_key = self._cache_key()

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
            f"alpha={self.alpha}, base_init_scale={self.base_init_scale}, ensemble={self.ensemble}, "
            f"project={self.project}, use_base={self.use_base}, base_rank={self.base_rank}"
        )
