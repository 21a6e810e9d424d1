"""LoRA adapters over frozen linear maps (DESIGN §10), and the contract every adapted layer keeps (DESIGN §3).

`W_k = W0 + s B_k A_k` with `s = alpha / r`, a frozen base `W0` (a buffer: no gradient, in no optimiser) and
trainable factors `A_k (r x in)`, `B_k (out x r)` for each adapter k of a shared base. `B = 0` by default, so
every adapter equals its base at step 0 (`init_B="gaussian"` draws B ~ N(0, 1/r) instead). A mixed batch picks
an adapter per row:

    y_b = x_b W0^T + bias + s (x_b A_{k_b}^T) B_{k_b}^T        two gathered batched products, no loop over k

Shapes follow `hypersphere`'s ensemble convention: with `ensemble=E` the base is (E, out, in), inputs
(E, N, in), and every adapter holds one factor pair per member; the adapter axis comes first:
`lora_A (num_adapters, [E,] r, in)`, `lora_B (num_adapters, [E,] out, r)`.

`AdapterLayer` is the contract that optimiser groups, dense targets, Polyak averaging and export rely on: a
frozen `base`, trainable `lora_A` / `lora_B`, a `scale`, and `effective_weight()`. The critic's hyperspherical
layer (`fasttd3_lora.lora.SphericalLoRALinear`) is the other kind that keeps it.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Mapping

import torch
from torch import Tensor, nn

from fasttd3_lora.hypersphere import SphericalLinear, check_ensemble, check_positive_int

__all__ = ["INIT_B", "LINEAR_TYPES", "linear_maps", "lora_delta", "check_rank_alpha", "AdapterLayer", "LoRALinear", "add_adapters", "adapted", "dense_merged", "adapter_layers", "adapter_parameters"]

INIT_B = ("zeros", "gaussian", "mirror")  # mirror: A = 0 and B Kaiming-uniform (LoRASA's code)
LINEAR_TYPES = (nn.Linear, SphericalLinear)  # the maps `add_adapters` can adapt


def lora_delta(lora_A: Tensor, lora_B: Tensor, scale: float, out: Tensor | None = None) -> Tensor:
    """`dW = s B A`: (out, r) @ (r, in) -> (out, in), batched over leading axes; into `out` if given."""
    return torch.matmul(lora_B, lora_A, out=out).mul_(scale)  # scaled in place: no second (out, in) temporary


def check_rank_alpha(rank: int, alpha: float, full: int) -> None:
    """`rank` in [1, full] (full = min(in, out)) and `alpha` a finite number > 0, or a one-line ValueError."""
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= full:
        raise ValueError(f"rank must be an int in [1, min(in, out)] = [1, {full}], got {rank!r}")
    if not (isinstance(alpha, (int, float)) and not isinstance(alpha, bool) and math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"alpha must be a finite number > 0, got {alpha!r}")


class AdapterLayer(nn.Module):
    """A linear map whose weight is a frozen `base` buffer plus the trainable low-rank `scale * lora_B @ lora_A`.

    Subclasses register `base`, `lora_A`, `lora_B` and set `rank`, `alpha`, `scale`, `in_features`,
    `out_features`, `ensemble`; they implement `effective_weight()` (the dense matrix a target or an export
    holds)."""

    base: Tensor
    lora_A: nn.Parameter
    lora_B: nn.Parameter
    rank: int
    alpha: float
    scale: float
    in_features: int
    out_features: int
    ensemble: int | None

    def adapter_parameters(self) -> list[nn.Parameter]:
        """What trains: the factors (their own optimiser group, DESIGN §3)."""
        return [self.lora_A, self.lora_B]

    def effective_weight(self) -> Tensor:
        raise NotImplementedError

    def dense_copy(self) -> nn.Module:
        """A dense layer computing this layer's current map, with no gradient (a target network's layer)."""
        raise NotImplementedError


def adapter_layers(net: nn.Module) -> list[AdapterLayer]:
    """Every adapted layer of `net` (declared by type, never found by name)."""
    return [m for m in net.modules() if isinstance(m, AdapterLayer)]


def adapter_parameters(net: nn.Module) -> list[nn.Parameter]:
    """The factors of every adapted layer of `net`."""
    return [p for layer in adapter_layers(net) for p in layer.adapter_parameters()]


def _linear_init(in_features: int, out_features: int, lead: tuple[int, ...], bias: bool) -> tuple[Tensor, Tensor | None]:
    """`nn.Linear`'s initial weight and bias, drawn per ensemble member."""
    weight = torch.empty(*lead, out_features, in_features)
    for member in weight.reshape(-1, out_features, in_features):
        nn.init.kaiming_uniform_(member, a=math.sqrt(5))
    bound = 1.0 / math.sqrt(in_features)
    return weight, (torch.empty(*lead, out_features).uniform_(-bound, bound) if bias else None)


class LoRALinear(AdapterLayer):
    """`num_adapters` LoRA adapters over one frozen linear map (module docstring); `forward(x, adapter=idx)`.

    `weight` / `bias` (optional) give W0 and its bias (default: `nn.Linear`'s init); the bias is frozen too.
    `alpha=None` means `alpha = rank` (scale 1)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int = 8,
        num_adapters: int = 1,
        alpha: float | None = None,
        *,
        bias: bool = True,
        ensemble: int | None = None,
        init_B: str = "zeros",
        weight: Tensor | None = None,
        bias_value: Tensor | None = None,
    ) -> None:
        super().__init__()
        check_positive_int("in_features", in_features)
        check_positive_int("out_features", out_features)
        check_positive_int("num_adapters", num_adapters)
        check_ensemble(ensemble)
        alpha = float(rank) if alpha is None else alpha
        check_rank_alpha(rank, alpha, min(in_features, out_features))
        if init_B not in INIT_B:
            raise ValueError(f"init_B must be one of {INIT_B}, got {init_B!r}")
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.num_adapters, self.ensemble = num_adapters, ensemble
        self.alpha = float(alpha)
        self.scale = self.alpha / rank
        lead = () if ensemble is None else (ensemble,)
        if weight is None:
            weight, bias_value = _linear_init(in_features, out_features, lead, bias)
        if tuple(weight.shape) != (*lead, out_features, in_features):
            raise ValueError(f"weight has shape {tuple(weight.shape)}, expected {(*lead, out_features, in_features)}")
        self.register_buffer("base", weight.detach().clone())
        if bias and bias_value is None:
            bias_value = torch.zeros(*lead, out_features, dtype=weight.dtype, device=weight.device)
        if bias_value is not None:
            if not bias or tuple(bias_value.shape) != (*lead, out_features):
                raise ValueError(f"bias_value has shape {tuple(bias_value.shape)}, expected {(*lead, out_features)}")
            # (E, 1, out) with an ensemble: per-feature values broadcast over each member's rows
            bias_value = bias_value.detach().clone() if ensemble is None else bias_value.detach().unsqueeze(-2).clone()
        self.register_buffer("base_bias", bias_value)
        dtype, device = self.base.dtype, self.base.device
        self.lora_A = nn.Parameter(torch.empty(num_adapters, *lead, rank, in_features, dtype=dtype, device=device))
        self.lora_B = nn.Parameter(torch.empty(num_adapters, *lead, out_features, rank, dtype=dtype, device=device))
        self.init_B = init_B
        self.reset_adapters_()

    @classmethod
    def from_linear(cls, layer: nn.Linear | SphericalLinear, rank: int = 8, num_adapters: int = 1,
                    alpha: float | None = None, *, init_B: str = "zeros") -> "LoRALinear":  # fmt: skip
        """Adapters over `layer`'s current weight and bias (both frozen from here on): an `nn.Linear`, or a
        SimbaV2 `SphericalLinear` without an ensemble axis (its rows are no longer projected once adapted)."""
        if not isinstance(layer, LINEAR_TYPES) or getattr(layer, "ensemble", None) is not None:
            raise ValueError(f"from_linear expects an nn.Linear or a SphericalLinear without ensemble, got "
                             f"{type(layer).__name__}")  # fmt: skip
        bias = getattr(layer, "bias", None)
        return cls(layer.in_features, layer.out_features, rank, num_adapters, alpha, bias=bias is not None,
                   init_B=init_B, weight=layer.weight, bias_value=bias)  # fmt: skip

    @torch.no_grad()
    def reset_adapters_(self, adapters: Iterable[int] | None = None) -> None:
        """Fresh factors for `adapters` (default all): A Kaiming-uniform (as `nn.Linear` draws weights, over the
        `in` fan-in), B zero (or N(0, 1/r) with `init_B="gaussian"`); `init_B="mirror"` is LoRASA's mirror image,
        A zero and B Kaiming-uniform over its `r` fan-in (every adapter still starts as the base)."""
        for k in range(self.num_adapters) if adapters is None else adapters:
            if self.init_B == "mirror":
                self.lora_A[k].zero_()
                for member in self.lora_B[k].reshape(-1, self.out_features, self.rank):
                    nn.init.kaiming_uniform_(member, a=math.sqrt(5))
                continue
            for member in self.lora_A[k].reshape(-1, self.rank, self.in_features):
                nn.init.kaiming_uniform_(member, a=math.sqrt(5))
            if self.init_B == "zeros":
                self.lora_B[k].zero_()
            else:
                nn.init.normal_(self.lora_B[k], std=1.0 / math.sqrt(self.rank))

    # -- the maps
    def merged_weight(self, adapter: int = 0) -> Tensor:
        """`W0 + s B_k A_k`, shape ([E,] out, in), differentiable in adapter k's factors."""
        k = self._index(adapter)
        return self.base + lora_delta(self.lora_A[k], self.lora_B[k], self.scale)

    def effective_weight(self) -> Tensor:
        """The dense map of adapter 0 (the contract's one matrix; `merged_weight(k)` for the others)."""
        return self.merged_weight(0)

    @torch.no_grad()
    def dense_copy(self, adapter: int = 0) -> nn.Linear:
        """`nn.Linear` holding adapter k's merged weight and the base bias (no ensemble: nn.Linear has none)."""
        if self.ensemble is not None:
            raise ValueError(f"dense_copy: nn.Linear has no ensemble axis (this layer has ensemble={self.ensemble})")
        dense = nn.Linear(self.in_features, self.out_features, bias=self.base_bias is not None)
        dense = dense.to(device=self.base.device, dtype=self.base.dtype)
        dense.weight.copy_(self.merged_weight(adapter))
        if self.base_bias is not None:
            dense.bias.copy_(self.base_bias)
        return dense.requires_grad_(False)

    def forward(self, x: Tensor, adapter: int | Tensor = 0) -> Tensor:
        """`x` (batch, in), or (E, batch, in) with an ensemble; `adapter` an int (every row), or a (batch,) long
        tensor: row b uses adapter `adapter[b]`."""
        y = x @ self.base.mT
        if self.base_bias is not None:
            y = y + self.base_bias
        if isinstance(adapter, Tensor):
            return y + self.scale * self._mixed_low_rank(x, adapter)
        k = self._index(adapter)
        return y + self.scale * ((x @ self.lora_A[k].mT) @ self.lora_B[k].mT)

    def _mixed_low_rank(self, x: Tensor, adapter: Tensor) -> Tensor:
        """`(x_b A_{k_b}^T) B_{k_b}^T` per row b, as two dense products over every adapter at once: `x A_all^T`
        (rows x N r), each row's block of its own adapter kept and the others zeroed, then `@ B_all^T`. Gathering
        each row's factors instead copies (rows, r, in) and (rows, out, r) tensors and was 3.5x slower than a loop
        over tasks at 4096 rows / 16 tasks (benchmarks/library_inference.py)."""
        rows = x.shape[-2]
        if adapter.dtype != torch.long or tuple(adapter.shape) != (rows,):
            raise ValueError(f"adapter must be an int or a ({rows},) long tensor, got {adapter.dtype} "
                             f"{tuple(adapter.shape)}")  # fmt: skip
        n, r = self.num_adapters, self.rank
        a, b = self.lora_A, self.lora_B  # (N, [E,] r, in), (N, [E,] out, r)
        if self.ensemble is not None:  # the ensemble axis first: (E, N, ...)
            a, b = a.transpose(0, 1), b.transpose(0, 1)
        a_all = a.reshape(*a.shape[:-3], n * r, self.in_features)  # ([E,] N r, in)
        b_all = b.movedim(-3, -2).reshape(*b.shape[:-3], self.out_features, n * r)  # ([E,] out, N r)
        owner = torch.arange(n, device=adapter.device).repeat_interleave(r)  # the adapter of each of the N r columns
        own = (adapter.unsqueeze(-1) == owner).to(x.dtype)  # (rows, N r)
        return ((x @ a_all.mT) * own) @ b_all.mT

    def _index(self, adapter: int) -> int:
        if isinstance(adapter, bool) or not isinstance(adapter, int) or not 0 <= adapter < self.num_adapters:
            raise ValueError(f"adapter must be an int in [0, {self.num_adapters}), got {adapter!r}")
        return adapter

    # -- one adapter as a file's worth of tensors (a library stores adapters, not networks)
    def adapter_state(self, adapter: int) -> dict[str, Tensor]:
        """Adapter k's factors, detached copies: `{"lora_A": ([E,] r, in), "lora_B": ([E,] out, r)}`."""
        k = self._index(adapter)
        return {"lora_A": self.lora_A[k].detach().clone(), "lora_B": self.lora_B[k].detach().clone()}

    @torch.no_grad()
    def load_adapter_state_(self, adapter: int, state: Mapping[str, Tensor]) -> None:
        """Write `adapter_state`'s output into adapter k; a missing key or a wrong shape is refused in one line."""
        k = self._index(adapter)
        for key, param in (("lora_A", self.lora_A), ("lora_B", self.lora_B)):
            value = state.get(key)
            if not isinstance(value, Tensor) or value.shape != param.shape[1:]:
                got = "missing" if value is None else f"shape {tuple(getattr(value, 'shape', ()))}"
                raise ValueError(f"adapter state {key}: {got}, expected shape {tuple(param.shape[1:])}")
            param[k].copy_(value)

    # -- sizes
    def adapter_numel(self) -> int:
        """Trainable numbers of one adapter: `r (in + out)` per ensemble member (DESIGN §10)."""
        return self.lora_A[0].numel() + self.lora_B[0].numel()

    def adapter_nbytes(self) -> int:
        """Bytes of one adapter's factors."""
        return self.adapter_numel() * self.lora_A.element_size()

    def base_numel(self) -> int:
        """Numbers of the frozen map (weight and bias): what a full copy per task would store."""
        return self.base.numel() + (0 if self.base_bias is None else self.base_bias.numel())

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
            f"num_adapters={self.num_adapters}, alpha={self.alpha}, bias={self.base_bias is not None}, "
            f"ensemble={self.ensemble}, init_B={self.init_B!r}"
        )


def linear_maps(net: nn.Module) -> list[nn.Module]:
    """Every linear map of `net` that `add_adapters` can adapt (`LINEAR_TYPES`, no ensemble), in module order."""
    return [m for m in net.modules() if isinstance(m, LINEAR_TYPES) and getattr(m, "ensemble", None) is None]


def add_adapters(
    net: nn.Module,
    layers: Iterable[nn.Module],
    rank: int = 8,
    num_adapters: int = 1,
    alpha: float | None = None,
    *,
    init_B: str = "zeros",
) -> list[LoRALinear]:
    """Replace each of `layers` (modules of `net`, chosen by the caller) by a `LoRALinear` over its current
    weight and bias, in place; returns the new layers in the order given. A layer narrower than `rank` gets rank
    min(in, out) (more would add nothing), with alpha scaled along so every layer's scale is `alpha / rank` (1 for
    `alpha=None`). A layer that is not a child of some module of `net` is refused."""
    parents = {id(child): (parent, name) for parent in net.modules() for name, child in parent.named_children()}
    check_positive_int("rank", rank)
    adapted = []
    for layer in layers:
        if id(layer) not in parents:
            raise ValueError(f"add_adapters: {type(layer).__name__} {layer} is not a submodule of the network")
        parent, name = parents[id(layer)]
        r = min(rank, layer.in_features, layer.out_features)
        new = LoRALinear.from_linear(layer, r, num_adapters, None if alpha is None else alpha * r / rank, init_B=init_B)
        setattr(parent, name, new)
        adapted.append(new)
    return adapted


def adapted(layer: nn.Module, x: Tensor, adapter: int | Tensor) -> Tensor:
    """`layer(x)`, with `adapter` (each row's, or one for all) where the layer carries adapters."""
    return layer(x, adapter=adapter) if isinstance(layer, AdapterLayer) else layer(x)


@torch.no_grad()
def dense_merged(net: nn.Module, adapter: int) -> nn.Module:
    """A copy of `net` in which every `LoRALinear` is replaced by its `dense_copy(adapter)` (adapter k merged
    into a plain `nn.Linear`): what export deploys for one task or agent."""
    merged = copy.deepcopy(net)
    parents = [(parent, name, child) for parent in merged.modules() for name, child in parent.named_children()]
    for parent, name, child in parents:
        if isinstance(child, LoRALinear):
            setattr(parent, name, child.dense_copy(adapter))
    return merged
