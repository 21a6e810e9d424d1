"""The fused hyperspherical-LoRA weight op (DESIGN §3 "The fused kernel", Eqs. 11-13).

The Triton kernel runs in the interpreter here (TRITON_INTERPRET=1, set below before triton is imported; the
Makefile sets it too), so its code is exercised on the CPU against the torch reference of fasttd3_lora.lora.
Interpreted Triton is slow: the big shapes use rank 5 and appear once each.
"""

import copy
import math
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from fasttd3_lora.hypersphere import l2_normalize  # noqa: E402
from fasttd3_lora.kernels import BACKENDS, cached_lora_weight, lora_weight, ops  # noqa: E402
from fasttd3_lora.lora import SphericalLoRALinear  # noqa: E402
from fasttd3_lora.lora_projection import hyperspherical_lora_weight  # noqa: E402
from fasttd3_lora.networks import make_critic  # noqa: E402

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="the Triton kernel runs on CPU only under TRITON_INTERPRET=1"
)

SCALE = 1.6  # alpha / r; any positive value, chosen != 1 so a dropped factor would show
BF16_ULP = 2.0**-8  # bf16 spacing in [0.5, 1); relative spacing is between 2^-8 and 2^-7


def make_inputs(out_f, in_f, rank, lead=(), dtype=torch.float32, base_sq=0.5, seed=0):
    """W0 rows of squared norm `base_sq` (Eq. 14) and adapters ~ N(0, 1/r) (Eq. 15)."""
    g = torch.Generator().manual_seed(seed)
    base = l2_normalize(torch.randn(*lead, out_f, in_f, generator=g)) * math.sqrt(base_sq)
    lora_A = torch.randn(*lead, rank, in_f, generator=g) / math.sqrt(rank)
    lora_B = torch.randn(*lead, out_f, rank, generator=g) / math.sqrt(rank)
    return base.to(dtype), lora_A.to(dtype), lora_B.to(dtype)


def rel_err(x, ref):
    """max |x - ref| / max |ref|, in float64."""
    x, ref = x.double(), ref.double()
    return ((x - ref).abs().max() / ref.abs().max()).item()


def run_both(base, lora_A, lora_B, project=True):
    """Triton and reference on copies of B; returns ((w, c, B) triton, (w, c, B) reference, B before)."""
    b_before = lora_B.clone()
    b_tri, b_ref = lora_B.clone(), lora_B.clone()
    tri = lora_weight(base, lora_A, b_tri, SCALE, project=project, backend="triton")
    ref = lora_weight(base, lora_A, b_ref, SCALE, project=project, backend="torch")
    return (*tri, b_tri), (*ref, b_ref), b_before


def assert_projection_contract(base, base_before, w, c, lora_B, b_before, row_tol, b_rtol=1e-6):
    assert torch.equal(base, base_before), "W0 must be bit-identical"
    assert torch.all(c > 0)
    row_err = (torch.linalg.vector_norm(w.double(), dim=-1) - 1).abs().max().item()
    assert row_err <= row_tol, f"max | ||w_i|| - 1 | = {row_err}"
    expected_b = (b_before.float() * c.unsqueeze(-1)).to(lora_B.dtype)
    torch.testing.assert_close(lora_B, expected_b, rtol=b_rtol, atol=0)


@pytest.mark.parametrize(
    "shape,lead", [((512, 2048), ()), ((2048, 512), ()), ((1024, 4096), ()), ((123, 77), ()), ((300, 333), (2,))]
)
def test_triton_matches_reference_fp32(shape, lead):
    base, lora_A, lora_B = make_inputs(*shape, rank=5, lead=lead)
    base_before = base.clone()
    (w, c, b_tri), (w_ref, c_ref, b_ref), b_before = run_both(base, lora_A, lora_B)
    assert w.dtype == torch.float32 and c.dtype == torch.float32 and c.shape == base.shape[:-1]
    assert rel_err(w, w_ref) <= 1e-5
    assert ((c.double() - c_ref.double()).abs() / c_ref.double()).max().item() <= 1e-5
    assert rel_err(b_tri, b_ref) <= 1e-5
    assert_projection_contract(base, base_before, w, c, b_tri, b_before, row_tol=1e-5)


@pytest.mark.parametrize("shape,lead", [((512, 2048), ()), ((123, 77), ()), ((300, 333), (2,))])
def test_triton_matches_reference_bf16(shape, lead):
    base, lora_A, lora_B = make_inputs(*shape, rank=5, lead=lead, dtype=torch.bfloat16)
    base_before = base.clone()
    (w, c, b_tri), (w_ref, c_ref, b_ref), b_before = run_both(base, lora_A, lora_B)
    assert w.dtype == torch.bfloat16 and b_tri.dtype == torch.bfloat16
    # Same bf16 inputs and fp32 math on both sides: c agrees to fp32 accuracy, W_eff and B to one bf16
    # rounding (entries of W_eff are below 1 in magnitude, so one ulp is at most 2^-8 absolute; for B one
    # ulp is at most 2^-7 relative). The interpreter rounds fp32 -> bf16 toward zero where GPUs and torch
    # round to nearest even, so a stored value may sit one ulp off torch's rounding.
    assert ((c.double() - c_ref.double()).abs() / c_ref.double()).max().item() <= 1e-5
    torch.testing.assert_close(w.float(), w_ref.float(), rtol=0, atol=BF16_ULP)
    torch.testing.assert_close(b_tri.float(), b_ref.float(), rtol=2 * BF16_ULP, atol=0)
    # W_eff = W0 + s B_new A with B_new stored in bf16: each entry of B_new is off its exact c·B by one
    # rounding (<= 2^-7 relative), so dw_i by <= 2^-7 ||dw_i|| <= 2^-7 (1 + ||w0_i||); the final rounding of
    # W_eff adds <= 2^-9. Row norms are therefore unit to 2^-7 * 1.71 + 2^-9 < 2^-6.
    assert_projection_contract(base, base_before, w, c, b_tri, b_before, row_tol=2.0**-6, b_rtol=2 * BF16_ULP)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_without_projection_both_backends_give_w0_plus_sba_and_leave_b(dtype):
    base, lora_A, lora_B = make_inputs(123, 77, rank=5, lead=(2,), dtype=dtype)
    (w, c, b_tri), (w_ref, c_ref, b_ref), b_before = run_both(base, lora_A, lora_B, project=False)
    expected = base.double() + SCALE * (lora_B.double() @ lora_A.double())
    # Unprojected entries exceed 1; bf16: the reference rounds s B A and the sum (2 roundings of <= 2^-8
    # relative each), Triton only the sum.
    tol = 1e-6 if dtype == torch.float32 else 4 * BF16_ULP * expected.abs().max().item()
    torch.testing.assert_close(w.double(), expected, rtol=0, atol=tol)
    torch.testing.assert_close(w_ref.double(), expected, rtol=0, atol=tol)
    assert torch.equal(c, torch.ones(2, 123)) and torch.equal(c_ref, c)
    assert torch.equal(b_tri, b_before) and torch.equal(b_ref, b_before)


@settings(max_examples=12, deadline=None)
@given(
    out_f=st.integers(1, 140),
    in_f=st.integers(8, 140),
    rank=st.integers(1, 20),
    lead=st.sampled_from([(), (1,), (3,)]),
    base_sq=st.floats(0.05, 0.95),
    seed=st.integers(0, 2**16),
)
def test_triton_matches_reference_on_any_shape(out_f, in_f, rank, lead, base_sq, seed):
    """Any sizes (not multiples of the blocks, rank padded to 16 or 32), any W0 norm in (0, 1).

    Rows of at least 8 inputs and r <= min(in, out) (SphericalLoRALinear's range): with a single input column, a row
    of dW = s B A is one dot product that can cancel to ~1e-3 of its terms, and then dW itself (so c, which
    scales like 1 / ||dw_i||) carries fp32 summation-order error of ~3e-5 on either backend."""
    rank = min(rank, in_f, out_f)
    base, lora_A, lora_B = make_inputs(out_f, in_f, rank, lead=lead, base_sq=base_sq, seed=seed)
    base_before = base.clone()
    (w, c, b_tri), (w_ref, c_ref, b_ref), b_before = run_both(base, lora_A, lora_B)
    assert rel_err(w, w_ref) <= 1e-5
    assert ((c.double() - c_ref.double()).abs() / c_ref.double()).max().item() <= 1e-5
    assert_projection_contract(base, base_before, w, c, b_tri, b_before, row_tol=1e-5)
    # After projection, the cached-style W_eff is what the new B gives: W0 + s B_new A.
    torch.testing.assert_close(w, base + SCALE * (b_tri @ lora_A), rtol=0, atol=1e-5)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("project", [True, False])
def test_weight_stays_fp32_inside_a_bf16_autocast_region(backend, project):
    base, lora_A, lora_B = make_inputs(40, 30, 4)
    b_ref = lora_B.clone()
    w_ref, _ = lora_weight(base, lora_A, b_ref, SCALE, project=project, backend="torch")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        w, _ = lora_weight(base, lora_A, lora_B, SCALE, project=project, backend=backend)
    assert w.dtype == torch.float32
    torch.testing.assert_close(w, w_ref, rtol=0, atol=1e-6)


def test_projected_weight_is_the_references_w0_plus_c_delta_from_one_product():
    """DESIGN §3: W_eff = W0 + diag(c) ΔW with ΔW = s B A of the B given, the reference's arithmetic exactly."""
    base, lora_A, lora_B = make_inputs(123, 77, 5, lead=(2,))
    w_ref, c_ref = hyperspherical_lora_weight(base, lora_A, lora_B, SCALE)
    w, c = lora_weight(base, lora_A, lora_B, SCALE, backend="torch")
    assert torch.equal(w, w_ref) and torch.equal(c, c_ref)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_projected_weight_equals_the_unprojected_op_on_the_new_b_to_rounding(backend, dtype):
    """W0 + diag(c) s B A and W0 + s (diag(c) B) A are one matrix in exact arithmetic; a layer's saved W_eff
    and a recomputation from its parameters differ by rounding only."""
    base, lora_A, lora_B = make_inputs(123, 77, 5, lead=(2,), dtype=dtype)
    w_projected, _ = lora_weight(base, lora_A, lora_B, SCALE, backend=backend)
    w_again, _ = lora_weight(base, lora_A, lora_B, SCALE, project=False, backend=backend)
    # bf16: B_new is rounded to bf16 before the recomputation (one ulp of each entry), W_eff rounded once more.
    tol = 1e-6 if dtype == torch.float32 else 2 * BF16_ULP
    assert rel_err(w_again, w_projected) <= tol


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("project", [True, False])
def test_out_receives_the_same_weight_in_place(backend, dtype, project):
    base, lora_A, lora_B = make_inputs(40, 30, 4, lead=(2,), dtype=dtype)
    b_alloc = lora_B.clone()
    w_alloc, c_alloc = lora_weight(base, lora_A, b_alloc, SCALE, project=project, backend=backend)
    out = torch.full_like(base, float("nan"))
    w, c = lora_weight(base, lora_A, lora_B, SCALE, project=project, backend=backend, out=out)
    assert w.data_ptr() == out.data_ptr()
    assert torch.equal(out, w_alloc) and torch.equal(c, c_alloc) and torch.equal(lora_B, b_alloc)


def test_out_of_the_wrong_shape_or_dtype_is_refused():
    base, lora_A, lora_B = make_inputs(40, 30, 4)
    for bad in (torch.empty(30, 40), torch.empty(40, 30, dtype=torch.float64)):
        with pytest.raises(ValueError, match="out must match base"):
            lora_weight(base, lora_A, lora_B, SCALE, out=bad)


def test_projection_is_in_place_on_the_given_b():
    base, lora_A, lora_B = make_inputs(40, 30, 4)
    param = torch.nn.Parameter(lora_B.clone())
    ptr, version = param.data_ptr(), param._version
    _, c = lora_weight(base, lora_A, param, SCALE)
    assert param.data_ptr() == ptr and param._version > version
    torch.testing.assert_close(param.detach(), lora_B * c.unsqueeze(-1), rtol=1e-6, atol=0)


def test_dense_weight_passes_gradcheck_in_float64():
    base, lora_A, lora_B = make_inputs(7, 6, 3, lead=(2,), dtype=torch.float64)
    lora_A.requires_grad_()
    lora_B.requires_grad_()

    def dense(a, b):
        return lora_weight(base, a, b, SCALE, project=False, backend="torch")[0]

    assert torch.autograd.gradcheck(dense, (lora_A, lora_B))


def grads_of(weight_fn, lora_A, lora_B, probe):
    """d<probe, W>/dA, dB for the W that weight_fn(A, B) returns."""
    a = lora_A.clone().requires_grad_()
    b = lora_B.clone().requires_grad_()
    (weight_fn(a, b) * probe).sum().backward()
    return a.grad, b.grad, b.detach()


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_every_path_back_propagates_as_w0_plus_sba(backend):
    base, lora_A, lora_B = make_inputs(37, 29, 4, lead=(2,))
    probe = torch.randn(base.shape, generator=torch.Generator().manual_seed(1))

    def explicit(a, b):
        return base + SCALE * (b @ a)

    def dense(a, b):
        return lora_weight(base, a, b, SCALE, project=False, backend=backend)[0]

    def cached(a, b):
        with torch.no_grad():
            w = base + SCALE * (b @ a)
        return cached_lora_weight(w, a, b, SCALE)

    def projected(a, b):  # gradients as W0 + s B_new A, B_new being b after the in-place projection
        return lora_weight(base, a, b, SCALE, project=True, backend=backend)[0]

    ga, gb, _ = grads_of(explicit, lora_A, lora_B, probe)
    for fn in (dense, cached):
        fa, fb, _ = grads_of(fn, lora_A, lora_B, probe)
        torch.testing.assert_close(fa, ga, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(fb, gb, rtol=1e-5, atol=1e-6)
    pa, pb, b_new = grads_of(projected, lora_A, lora_B, probe)
    na, nb, _ = grads_of(explicit, lora_A, b_new, probe)
    torch.testing.assert_close(pa, na, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(pb, nb, rtol=1e-5, atol=1e-6)


def test_cached_weight_refuses_a_backward_after_b_changed():
    base, lora_A, lora_B = make_inputs(8, 6, 2)
    a, b = lora_A.clone().requires_grad_(), lora_B.clone().requires_grad_()
    w = cached_lora_weight(base + SCALE * (lora_B @ lora_A), a, b, SCALE)
    with torch.no_grad():
        b.mul_(2.0)  # an optimiser step between forward and backward: the cache would be stale
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        w.sum().backward()


def test_bad_backend_is_named_with_the_allowed_values():
    base, lora_A, lora_B = make_inputs(8, 6, 2)
    with pytest.raises(ValueError, match=r"backend must be one of \('auto', 'triton', 'torch'\), got 'cuda'"):
        lora_weight(base, lora_A, lora_B, SCALE, backend="cuda")
    assert BACKENDS == ("auto", "triton", "torch")


def test_triton_without_triton_is_one_clear_line(monkeypatch):
    monkeypatch.setattr(ops, "_HAS_TRITON", False)
    base, lora_A, lora_B = make_inputs(8, 6, 2)
    with pytest.raises(ImportError) as info:
        lora_weight(base, lora_A, lora_B, SCALE, backend="triton")
    assert "triton" in str(info.value) and "\n" not in str(info.value)
    # "auto" does not need it
    lora_weight(base, lora_A, lora_B, SCALE, backend="auto")


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")
    base, lora_A, lora_B = make_inputs(8, 6, 2)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1, got device cpu"):
        lora_weight(base, lora_A, lora_B, SCALE, backend="triton")


def test_auto_is_the_reference_on_cpu():
    base, lora_A, lora_B = make_inputs(8, 6, 2)
    assert ops._resolve_backend("auto", base) == "torch"
    # float64 only exists on the reference path, so "auto" on CPU must accept it
    w, _ = lora_weight(*(t.double() for t in (base, lora_A, lora_B)), SCALE)
    assert w.dtype == torch.float64


@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda w, a, b: (w, a[:, :-1], b), r"expected lora_A \(\.\.\., r, 6\)"),
        (lambda w, a, b: (w, a, b[:-1]), r"expected lora_A"),
        (lambda w, a, b: (w[None], a, b), r"expected lora_A"),
        (lambda w, a, b: (w[None, None], a, b), r"base must be \(out, in\) or \(E, out, in\)"),
        (lambda w, a, b: (w, a.double(), b), "one float dtype"),
        (lambda w, a, b: (w.requires_grad_(), a, b), "W0 is frozen"),
    ],
)
def test_bad_inputs_are_rejected(mutate, match):
    base, lora_A, lora_B = make_inputs(8, 6, 2)
    with pytest.raises(ValueError, match=match):
        lora_weight(*mutate(base.clone(), lora_A, lora_B), SCALE)


@pytest.mark.parametrize("scale", [0.0, -1.0, float("nan"), float("inf"), True])
def test_bad_scale_is_rejected(scale):
    base, lora_A, lora_B = make_inputs(8, 6, 2)
    with pytest.raises(ValueError, match="scale must be a finite number > 0"):
        lora_weight(base, lora_A, lora_B, scale)


def test_triton_rejects_float64():
    base, lora_A, lora_B = (t.double() for t in make_inputs(8, 6, 2))
    with pytest.raises(ValueError, match="backend='triton' supports dtypes"):
        lora_weight(base, lora_A, lora_B, SCALE, backend="triton")


# ---- SphericalLoRALinear and the critic use the op (issue item 5) ----


def lora_layer(in_f=24, out_f=40, ensemble=2, seed=0, **kw):
    torch.manual_seed(seed)
    return SphericalLoRALinear(in_f, out_f, rank=4, alpha=4.0, ensemble=ensemble, **kw)


def dense_rows(layer):
    """A batch size that takes the dense W_eff path (DESIGN §3 crossover)."""
    return int(layer.in_features * layer.out_features / (layer.in_features + layer.out_features)) + 1


@pytest.mark.parametrize("project", [True, False])
def test_project_refreshes_b_and_the_cached_weight_in_one_call(project):
    layer = lora_layer(project=project)
    b_before = layer.lora_B.detach().clone()
    layer.project_()
    w_eff = layer.w_eff
    want, _ = hyperspherical_lora_weight(layer.base, layer.lora_A.detach(), b_before, layer.scale, project=project)
    assert torch.equal(w_eff, want)  # W0 + diag(c) ΔW from the B before the call
    torch.testing.assert_close(w_eff, layer.base + layer.delta_weight(), rtol=1e-6, atol=1e-7)
    assert torch.equal(layer.effective_weight(), w_eff)
    if project:  # B was projected at init already, so a second projection is (numerically) the identity
        torch.testing.assert_close(layer.lora_B.detach(), b_before, rtol=1e-6, atol=0)
        assert_projection_contract(layer.base, layer.base.clone(), w_eff, torch.ones(2, 40), layer.lora_B, b_before, 1e-5)
    else:  # LoRA-NoWN: the cache is refreshed, B untouched
        assert torch.equal(layer.lora_B, b_before)


def test_dense_forward_and_effective_weight_use_a_fresh_cache_and_never_a_stale_one():
    layer = lora_layer()
    x = torch.randn(2, dense_rows(layer), 24, generator=torch.Generator().manual_seed(3))
    probe = torch.randn(2, x.shape[1], 40, generator=torch.Generator().manual_seed(4))

    def out_and_grads(fn):
        layer.zero_grad()
        y = fn(x)
        (y * probe).sum().backward()
        return y.detach(), layer.lora_A.grad.clone(), layer.lora_B.grad.clone()

    def explicit(inp):
        return inp @ (layer.base + layer.delta_weight()).mT

    cached = layer.w_eff
    for got, want in zip(out_and_grads(layer), out_and_grads(explicit)):  # fresh: served from the cache
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert layer.w_eff is cached
    with torch.no_grad():  # an optimiser-like update without project_(): the cache is now stale
        layer.lora_A.add_(0.1)
    y_stale = x @ cached.mT
    assert torch.equal(layer.effective_weight(), layer.base + layer.delta_weight())
    y, ga, gb = out_and_grads(layer)
    y_ref, ga_ref, gb_ref = out_and_grads(explicit)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ga, ga_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gb, gb_ref, rtol=1e-5, atol=1e-6)
    assert (y - y_stale).abs().max() > 1e-2


def test_saved_weight_reloads_exactly_and_a_state_dict_without_it_gets_it_recomputed():
    """W_eff is state (it is W0 + s B A only to rounding), so exact resume needs it saved and reloaded as is."""
    layer = lora_layer(seed=0)
    with torch.no_grad():  # an optimiser-like step and its projection, so W_eff is not the init's
        layer.lora_A.add_(0.05)
    layer.project_()
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    assert "w_eff" in state

    fresh = lora_layer(seed=1)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.effective_weight(), layer.w_eff)

    old_format = {k: v for k, v in state.items() if k != "w_eff"}  # saved before W_eff was state
    older = lora_layer(seed=2)
    older.load_state_dict(old_format)  # strict: no missing-key error
    assert torch.equal(older.lora_B, layer.lora_B)  # not re-projected
    assert torch.equal(older.effective_weight(), older.base + older.delta_weight())
    torch.testing.assert_close(older.effective_weight(), layer.w_eff, rtol=1e-6, atol=1e-7)


def test_project_reuses_the_weight_buffer_and_a_graph_on_the_old_weight_fails_loudly():
    layer = lora_layer()
    x = torch.randn(2, dense_rows(layer), 24, generator=torch.Generator().manual_seed(5))
    storage = layer.w_eff.data_ptr()
    y = layer(x)  # dense path: the graph saves W_eff
    with torch.no_grad():
        layer.lora_A.add_(0.05)
    layer.project_()
    assert layer.w_eff.data_ptr() == storage  # no new (out, in) buffer per step
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


def test_a_deep_copy_serves_the_same_weight_while_current_and_recomputes_once_stale():
    layer = lora_layer()
    with torch.no_grad():
        layer.lora_A.add_(0.05)
    layer.project_()
    twin = copy.deepcopy(layer)
    assert torch.equal(twin.effective_weight(), layer.effective_weight())
    assert not torch.equal(layer.w_eff, layer.base + layer.delta_weight())  # so the check above can fail
    with torch.no_grad():  # stale when copied: the copy must not trust its W_eff either
        layer.lora_A.add_(0.05)
    stale_twin = copy.deepcopy(layer)
    assert torch.equal(stale_twin.effective_weight(), stale_twin.base + stale_twin.delta_weight())


def test_compiled_lora_critic_forward_backward_has_no_graph_break_and_matches_eager():
    torch.manual_seed(0)
    critic = make_critic(
        "lora", obs_dim=5, act_dim=2, hidden_dim=16, num_blocks=1, num_atoms=11, v_min=-1.0, v_max=1.0,
        num_critics=2, lora=dict(rank=4, alpha=4.0),
    )  # fmt: skip
    g = torch.Generator().manual_seed(1)
    # 32 rows > 16*64/(16+64): both block matrices take the dense W_eff path, i.e. the op is in the graph.
    obs, act = torch.randn(32, 5, generator=g), torch.randn(32, 2, generator=g)
    target = torch.softmax(torch.randn(2, 32, 11, generator=g), dim=-1)

    def loss_and_grads(fn):
        critic.zero_grad()
        logits = fn(obs, act)
        loss = -(target * torch.log_softmax(logits, dim=-1)).sum(-1).mean()
        loss.backward()
        return [logits.detach()] + [p.grad.clone() for p in critic.parameters()]

    ops_seen = set()

    def recording_inductor(gm, example_inputs):
        ops_seen.update(node.target for node in gm.graph.nodes if node.op == "call_function")
        return torch._inductor.compile(gm, example_inputs)

    eager = loss_and_grads(critic)
    compiled = loss_and_grads(torch.compile(critic, fullgraph=True, backend=recording_inductor))
    assert torch.ops.fasttd3_lora.lora_weight_dense.default in ops_seen
    for got, want in zip(compiled, eager, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
