"""Batched entropic optimal transport on torch: log-domain Sinkhorn, the one OT kernel of ``rclip``.

One problem is a cost C (N, M) between N source points with weights a (N,) and M target points with weights b (M,),
each summing to 1. Leading batch dims solve many problems at once, e.g. COLA's B images × K classes: cost
(B, K, N, M) between N image views and M class descriptions, a (B, K, N) or (B, 1, N), b (K, M) or (B, K, M).

The entropic plan P = argmin_{P 1 = a, Pᵀ 1 = b} <P, C> + reg · KL(P ‖ a bᵀ) is P_ij = exp(α_i + β_j - C_ij/reg)
with dimensionless log-scalings α, β (the dual potentials are reg · α, reg · β). :func:`sinkhorn` returns

* ``cost`` = <P, C>: the linear cost of the entropic plan, in the cost's units — COLA's "OT distance" and what
  POT's ``sinkhorn2`` returns;
* ``entropic`` = <P, C> + reg · KL(P ‖ a bᵀ): the regularised objective (at convergence the dual value
  <f, a> + <g, b> with f, g normalised so that P_ij = a_i b_j exp((f_i + g_j - C_ij) / reg)).

Gradients: d entropic / dC = P (envelope theorem), but d cost / dC = P + <C, dP/dC> ≠ P, because the plan moves
with the cost. ``grad="implicit"`` (default) gives both exactly at the returned plan: backward differentiates the
marginal constraints of P (one small linear solve per problem on its smaller side), with memory that does not grow
with the iterations. ``grad="unrolled"`` backpropagates through every iteration instead: the exact gradient of what
was computed, converged or not, at the price of one (..., N, M) tensor kept per iteration.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.autograd.function import once_differentiable

from rclip.errors import RClipError


@dataclass
class SinkhornResult:
    """What :func:`sinkhorn` returns; (...) is the batch shape (cost's and weights' leading dims, broadcast).

    cost: (...) <P, C>, in the cost's units. entropic: (...) <P, C> + reg · KL(P ‖ a bᵀ). Both None when
        :func:`sinkhorn` was called with ``values=False``.
    plan: (..., N, M) the plan P, only with ``return_plan=True`` (else None). Its columns sum to b (to rounding),
        its rows to a up to ``error``.
    error: (...) the returned plan's total marginal violation, Σ_i |(P 1)_i - a_i| + Σ_j |(Pᵀ 1)_j - b_j|,
        measured on the plan itself (not the solver's running estimate).
    n_iter: iterations run (each updates both potentials): the most any chunk of the batch ran (see
        :data:`CPU_CHUNK_ENTRIES`; on CUDA the whole batch is one chunk).
    converged: (...) bool, ``error`` within the tolerance. Where it is False the plan is not a transport plan of
        (a, b) and ``cost`` may even lie below the exact OT cost; a warning says so (once per call site).
    """
    cost: torch.Tensor | None
    entropic: torch.Tensor | None
    plan: torch.Tensor | None
    error: torch.Tensor
    n_iter: int
    converged: torch.Tensor | None = None


class ConvergenceTally:
    """A running count of the Sinkhorn problems a method solved and of those that did not converge, for methods
    that solve many (COLA per forward pass, fusion per layer) to report in their results beside what they
    computed. ``tally.add(result)`` after each :func:`sinkhorn` call; ``tally.summary()`` ->
    ``{"problems", "not_converged", "worst_error"}`` (the largest marginal violation of any returned plan)."""

    def __init__(self):
        self.problems, self.not_converged, self.worst_error = 0, 0, 0.0

    def add(self, result: SinkhornResult) -> SinkhornResult:
        ok = result.converged
        self.problems += ok.numel()
        self.not_converged += int((~ok).sum())
        if ok.numel():
            self.worst_error = max(self.worst_error, float(result.error.detach().max()))
        return result

    def summary(self) -> dict:
        return {"problems": self.problems, "not_converged": self.not_converged,
                "worst_error": float(f"{self.worst_error:.3g}")}


def sinkhorn(cost: torch.Tensor, a: torch.Tensor | None = None, b: torch.Tensor | None = None, *, reg: float,
             max_iter: int = 1000, tol: float | None = None, return_plan: bool = False,
             grad: str = "implicit", domain: str = "log", values: bool = True) -> SinkhornResult:
    """Entropic OT for a batch of problems by Sinkhorn, in the log domain (or, on request, the kernel domain).

    Args:
        cost: (..., N, M) finite costs (e.g. 1 - cosine, in [0, 2]); float64 is solved in float64, any other dtype
            in float32 (results are in that dtype).
        a: (..., N) and b: (..., M) non-negative weights summing to 1 per problem (within 1e-4, 1e-2 for 16-bit
            inputs; then renormalised exactly); None = uniform. Zero entries are allowed (zero rows / columns
            of the plan). Leading dims broadcast against the cost's.
        reg: entropic regularisation ε > 0, in the cost's units (COLA / AWT: 0.1 on 1 - cosine). Smaller is closer
            to exact OT and needs more iterations.
        max_iter: at most this many iterations. tol: stop when every problem's ``error`` is ≤ tol
            (default 1e-9 in float64, 1e-6 in float32); tol=0 runs ``max_iter`` iterations.
        return_plan: also return the plan (..., N, M).
        grad: ``"implicit"`` or ``"unrolled"`` (see the module docstring); gradients flow to cost, a and b.
        domain: where the iterations run. ``"log"``: log-sum-exp updates of the log-scalings, safe for any cost
            scale. ``"kernel"``: the classical scaling updates u = a / K v, v = b / Kᵀ u on K = exp(-(C - min C) /
            reg), two batched matrix-vector products per iteration and no exponential (1.5x faster on 2 CPU
            cores at OTCCLIP's re-matching sizes, ``benchmarks/bench_rematch.py``); the same plan, returned through the same log-scalings. It needs the
            kernel not to underflow: each problem's cost range / reg at most :data:`KERNEL_MAX_RANGE` (float32;
            float64: 10x that), and ``grad="implicit"`` (its iterations carry no gradient). ``"auto"``: kernel
            where both hold, else log.
        values: compute the plan's costs ``cost`` and ``entropic``; ``False`` leaves them None, for callers that use
            only the plan and its convergence (OT fusion: at 3 072 × 3 072 the two costs take longer than the
            iterations). Needs ``return_plan=True``.
    """
    if not values and not return_plan:
        raise RClipError("sinkhorn(values=False) returns only the plan and its convergence: pass return_plan=True")
    cost, a, b, reg = _prepare(cost, a, b, reg, max_iter, tol, grad)
    if domain not in ("log", "kernel", "auto"):
        raise RClipError(f"domain must be 'log', 'kernel' or 'auto'; got {domain!r}")
    tol = (1e-9 if cost.dtype == torch.float64 else 1e-6) if tol is None else float(tol)
    kernel = domain != "log" and grad == "implicit" and _kernel_safe(cost.detach(), reg)
    if domain == "kernel" and not kernel:
        raise RClipError("domain='kernel' needs grad='implicit' and a cost range / reg of at most "
                         f"{KERNEL_MAX_RANGE:g} (float32; 10x that in float64) per problem, or the kernel exp(-C / "
                         "reg) underflows; use domain='auto' (falls back to the log domain) or 'log'")
    if grad == "implicit":
        with torch.no_grad():
            step = _iterate_kernel if kernel else _iterate
            log_k = cost.detach() / -reg
            alpha, beta, n_iter, error = _iterate_in_chunks(log_k, a.detach(), b.detach(), max_iter, tol, step)
        if torch.is_grad_enabled() and (cost.requires_grad or a.requires_grad or b.requires_grad):
            plan = _ImplicitPlan.apply(cost, a, b, alpha, beta, reg)
        else:                                            # nothing to differentiate: the plan takes log_k's memory
            plan = _plan_over(log_k, alpha, beta)
    else:
        alpha, beta, n_iter, error = _iterate_in_chunks(cost / -reg, a, b, max_iter, tol)
        plan = torch.exp(alpha[..., :, None] + beta[..., None, :] - cost / reg)
    linear = entropic = None
    if values:
        linear = (plan * cost).sum((-2, -1))
        with torch.no_grad():  # log(P / a bᵀ), held fixed: the P-derivative of its own term is zero on the constraints
            log_ratio = (alpha - _log(a))[..., :, None] + (beta - _log(b))[..., None, :] - cost / reg
            log_ratio = torch.where(plan > 0, log_ratio, 0.0)  # 0 · log 0 = 0 on zero-weight rows and columns
        entropic = linear + reg * (plan * log_ratio).sum((-2, -1))
    with torch.no_grad():
        rows, cols = _marginals(plan.detach())
        error = ((rows - a.detach().double()).abs().sum(-1) + (cols - b.detach().double()).abs().sum(-1)).to(cost.dtype)
        check = tol if tol > 0 else (1e-9 if cost.dtype == torch.float64 else 1e-6)
        slack = 4 * torch.finfo(cost.dtype).eps * (cost.shape[-2] + cost.shape[-1])   # rounding of the plan's sums
        converged = error <= 2 * check + slack          # the row test the solver stopped on, plus the columns
    if tol > 0 and not bool(converged.all()):
        import warnings

        warnings.warn(f"sinkhorn did not converge for {int((~converged).sum())} of {converged.numel()} problems in "
                      f"{n_iter} iterations (worst marginal violation {float(error.max()):.3g} > tol {tol:g}, "
                      f"max cost / reg {float(cost.detach().abs().max()) / reg:.3g}): the plan is not a transport plan "
                      f"and its cost can fall below the exact OT cost. Use a larger reg, more iterations (max_iter), "
                      f"or float64 costs.", RuntimeWarning, stacklevel=2)
    return SinkhornResult(linear, entropic, plan if return_plan else None, error, n_iter, converged)


#: On the CPU the batch is solved in chunks of about this many cost entries, each chunk to its own stopping point:
#: small temporaries stay in cache and are reused instead of being mapped afresh every iteration (4-5x faster at
#: COLA's sizes on 2 cores). On CUDA the whole batch is one chunk.
CPU_CHUNK_ENTRIES = 1 << 18


#: The largest cost range / reg (per problem, float32) at which ``domain="kernel"`` is used: exp(-50) ≈ 2e-22, so
#: the kernel, its products and the scalings stay far inside float32's range.
KERNEL_MAX_RANGE = 50.0


def _kernel_safe(cost, reg):
    if cost.numel() == 0:
        return True
    spread = (cost.amax((-2, -1)) - cost.amin((-2, -1))).max()
    limit = KERNEL_MAX_RANGE * (10 if cost.dtype == torch.float64 else 1)
    return bool(spread / reg <= limit)


def _iterate_in_chunks(log_k, a, b, max_iter, tol, step=None):
    """``step`` (:func:`_iterate` or :func:`_iterate_kernel`) over chunks of the (flattened) batch on the CPU; the
    whole batch at once elsewhere."""
    step = step or _iterate
    n, m = log_k.shape[-2:]
    batch = log_k.shape[:-2]
    total, per = math.prod(batch), max(1, CPU_CHUNK_ENTRIES // (n * m))
    if log_k.device.type != "cpu" or total <= per:
        return step(log_k, a, b, max_iter, tol)
    flat_k, flat_a, flat_b = log_k.reshape(total, n, m), a.reshape(total, n), b.reshape(total, m)
    parts = [step(flat_k[i:i + per], flat_a[i:i + per], flat_b[i:i + per], max_iter, tol)
             for i in range(0, total, per)]
    alpha, beta, error = (torch.cat([p[j] for p in parts]) for j in (0, 1, 3))
    return (alpha.reshape(*batch, n), beta.reshape(*batch, m), max(p[2] for p in parts),
            error.reshape(batch))


def _iterate(log_k, a, b, max_iter, tol):
    """Sinkhorn on log_k = -C / reg (..., N, M). Returns α (..., N), β (..., M), iterations, row error (...).

    Each iteration sets β (columns exact), measures the rows of the plan (α, β) from the log-sum-exp that the
    α-update needs anyway, and stops there, so the returned plan is the one whose error is reported.
    """
    log_a, log_b = _log(a), _log(b)
    alpha = torch.zeros_like(a).masked_fill(a == 0, -math.inf)  # zero-weight rows are empty from the start
    # unrolled: every step stays on the tape; otherwise one scratch buffer serves every step
    scratch = None if log_k.requires_grad and torch.is_grad_enabled() else torch.empty_like(log_k)
    for n_iter in range(1, max_iter + 1):
        beta = log_b - _logsumexp_shifted(log_k, alpha[..., :, None], -2, scratch)
        lse = _logsumexp_shifted(log_k, beta[..., None, :], -1, scratch)
        with torch.no_grad():
            error = ((alpha + lse).exp() - a).abs().sum(-1)
        if n_iter == max_iter or error.numel() == 0 or error.max() <= tol:
            break
        alpha = log_a - lse
    return alpha, beta, n_iter, error.detach()


def _logsumexp_shifted(x, shift, dim, scratch=None):
    """``torch.logsumexp(x + shift, dim)``; given ``scratch`` (x's shape, overwritten), computed there with no
    temporary of x's size: torch's own steps (the maximum, infinite maxima set to 0, exp of the difference, sum, log,
    plus the maximum) in the same order, so the result is the same to the bit. At fusion's 3 072 x 3 072 plans the
    two temporaries torch allocates per call cost more than the arithmetic. Without ``scratch`` (autograd), torch's."""
    if scratch is None:
        return torch.logsumexp(x + shift, dim)
    torch.add(x, shift, out=scratch)
    top = scratch.amax(dim, keepdim=True)
    top.masked_fill_(top.abs() == math.inf, 0)
    return scratch.sub_(top).exp_().sum(dim).log_().add_(top.squeeze(dim))


def _iterate_kernel(log_k, a, b, max_iter, tol):
    """:func:`_iterate` by scaling updates on the kernel K = exp(log_k - max log_k) (no gradient): the same
    iterations (β, then the rows measured, then α), on u = exp(α), v = exp(β) and K instead of their logs.
    Returns the same quantities as :func:`_iterate`: α = log u (with the shift of K folded in), β = log v."""
    shift = log_k.amax((-2, -1), keepdim=True)                 # K's largest entry is 1; the smallest > e^-range
    kernel = (log_k - shift).exp()
    u = (a > 0).to(kernel.dtype)
    for n_iter in range(1, max_iter + 1):
        v = b / (kernel.mT @ u[..., None])[..., 0]
        kv = (kernel @ v[..., None])[..., 0]
        error = (u * kv - a).abs().sum(-1)
        if n_iter == max_iter or error.numel() == 0 or error.max() <= tol:
            break
        u = torch.where(a > 0, a / kv, 0.0)
    alpha = _log(u) - shift[..., 0]                            # P = u K v = exp(α + β + log_k)
    return alpha, _log(v), n_iter, error


def _marginals(plan):
    """The plan's row and column sums in float64. A problem of at most :data:`CPU_CHUNK_ENTRIES` entries (or any on
    CUDA) is converted whole; a larger one on the CPU a block of rows at a time (the rows' sums the same to the bit,
    the columns' added up block by block in float64), instead of a float64 copy of the whole plan (150 MB for
    fusion's two 3 072 x 3 072 plans)."""
    n, m = plan.shape[-2:]
    if plan.device.type != "cpu" or n * m <= CPU_CHUNK_ENTRIES:
        p = plan.double()
        return p.sum(-1), p.sum(-2)
    per = max(1, CPU_CHUNK_ENTRIES // m)
    rows, cols = [], 0
    for i in range(0, n, per):
        block = plan[..., i:i + per, :].double()
        rows.append(block.sum(-1))
        cols = cols + block.sum(-2)
    return torch.cat(rows, -1), cols


def _plan_over(log_k, alpha, beta):
    """The plan exp(α ⊕ β + log_k) written over ``log_k`` (which it consumes), a block of rows at a time so that
    α ⊕ β never exists at full size. α_i + β_j is rounded before log_k is added, as in :class:`_ImplicitPlan`'s
    forward, so the plan is the same to the bit (with log_k = -C / reg, t + log_k = t - C / reg exactly)."""
    n, m = log_k.shape[-2:]
    per = max(1, CPU_CHUNK_ENTRIES // (m * max(1, math.prod(log_k.shape[:-2])))) if log_k.device.type == "cpu" else n
    for i in range(0, n, per):
        log_k[..., i:i + per, :].add_(alpha[..., i:i + per, None] + beta[..., None, :])
    return log_k.exp_()


class _ImplicitPlan(torch.autograd.Function):
    """P = exp(α ⊕ β - C / reg) from converged log-scalings; backward by implicit differentiation.

    Perturbing (C, a, b) moves the potentials so that P keeps its marginals: with dP = P ∘ (dα ⊕ dβ - dC / reg),
    Σ_j dP_ij = da_i and Σ_i dP_ij = db_j. For an upstream gradient G on P, the adjoint (u, v) solves
    [[diag(P1), P], [Pᵀ, diag(Pᵀ1)]] [u; v] = [(P∘G) 1; (P∘G)ᵀ 1], and then
    dL/dC = P ∘ (u ⊕ v - G) / reg, dL/da = u, dL/db = v.
    """

    @staticmethod
    def forward(ctx, cost, a, b, alpha, beta, reg):
        plan = (alpha[..., :, None] + beta[..., None, :]).sub_(cost / reg).exp_()   # in place: one temporary fewer
        ctx.save_for_backward(plan)
        ctx.reg = reg
        return plan

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_plan):
        plan, = ctx.saved_tensors
        u, v = _adjoint(plan.double(), grad_plan.double())
        grad_cost = plan * (u[..., :, None] + v[..., None, :] - grad_plan.double()).to(plan.dtype) / ctx.reg
        return grad_cost, u.to(plan.dtype), v.to(plan.dtype), None, None, None


def _adjoint(plan, g):
    """Solve the adjoint system of :class:`_ImplicitPlan` by eliminating the larger side (Schur complement).

    With N ≤ M: v = (c - Pᵀu) / col, and S u = r - P (c / col) with S = diag(row) - P diag(1/col) Pᵀ, which is
    singular along 1 (the potentials' shared constant) and on empty rows; adding 1 1ᵀ on the live rows and 1 on
    the diagonal of empty ones picks the solution orthogonal to both.
    """
    if plan.shape[-2] > plan.shape[-1]:
        v, u = _adjoint(plan.mT, g.mT)
        return u, v
    pg = plan * g
    r, c = pg.sum(-1), pg.sum(-2)
    row, col = plan.sum(-1), plan.sum(-2)
    inv_col = torch.where(col > 0, 1 / col, 0.0)
    scaled = plan * inv_col[..., None, :]
    live = (row > 0).to(plan.dtype)
    schur = (torch.diag_embed(row + 1 - live) - scaled @ plan.mT + live[..., :, None] * live[..., None, :])
    rhs = r - (scaled * c[..., None, :]).sum(-1)
    u, info = torch.linalg.solve_ex(schur, rhs[..., None])
    if (info != 0).any():
        raise RClipError("the implicit Sinkhorn gradient is undefined: the plan's support is disconnected (reg is "
                         "too small for the cost's scale); use a larger reg or sinkhorn(..., grad='unrolled')")
    u = u[..., 0]
    v = (c - (plan * u[..., :, None]).sum(-2)) * inv_col
    return u, v


def _log(w):
    """log w with log 0 = -inf and a zero (not NaN) gradient there."""
    positive = w > 0
    return torch.where(positive, torch.where(positive, w, 1.0).log(), -math.inf)


def all_finite(x: torch.Tensor) -> bool:
    """No NaN or inf in ``x``: its two extremes are finite (NaN propagates through both). One reduction pass instead
    of ``torch.isfinite(x).all()``'s elementwise tests and a reduction."""
    if x.numel() == 0:
        return True
    lo, hi = torch.aminmax(x)
    return bool(torch.isfinite(lo) and torch.isfinite(hi))


def _prepare(cost, a, b, reg, max_iter, tol, grad):
    """Validate; cast to the compute dtype, renormalise the weights, broadcast all to the batch shape; reg as float."""
    cost = torch.as_tensor(cost)
    if cost.ndim < 2 or cost.shape[-2] == 0 or cost.shape[-1] == 0:
        raise RClipError(f"cost must have shape (..., N, M) with N, M >= 1; got {tuple(cost.shape)}")
    cost = cost.to(torch.float64 if cost.dtype == torch.float64 else torch.float32)
    if not all_finite(cost):
        bad = int((~torch.isfinite(cost)).sum())
        raise RClipError(f"cost contains NaN or inf ({bad} of {cost.numel()} entries); fix what produced it "
                         "(e.g. a zero vector normalised to unit length gives NaN cosines)")
    try:
        value = float(reg)                     # Python, numpy or one-element torch numbers
    except (TypeError, ValueError, RuntimeError):
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        raise RClipError(f"reg (the entropic regularisation, in the cost's units) must be a finite number > 0; "
                         f"got {reg!r}. For costs in [0, 2] such as 1 - cosine, 0.01-0.1 is typical")
    if not isinstance(max_iter, int) or max_iter < 1:
        raise RClipError(f"max_iter must be an integer >= 1; got {max_iter!r}")
    if tol is not None and not tol >= 0:
        raise RClipError(f"tol must be >= 0 (or None for the dtype's default); got {tol!r}")
    if grad not in ("implicit", "unrolled"):
        raise RClipError(f"grad must be 'implicit' or 'unrolled'; got {grad!r}")
    n, m = cost.shape[-2:]
    a = _weights(a, "a", n, cost)
    b = _weights(b, "b", m, cost)
    try:
        batch = torch.broadcast_shapes(cost.shape[:-2], a.shape[:-1], b.shape[:-1])
    except RuntimeError:
        raise RClipError(f"the batch dims of cost {tuple(cost.shape)} (..., N, M), a {tuple(a.shape)} (..., N) and "
                         f"b {tuple(b.shape)} (..., M) do not broadcast; insert singleton dims, e.g. a[:, None] "
                         "for weights shared by the classes") from None
    return cost.expand(*batch, n, m), a.expand(*batch, n), b.expand(*batch, m), value


def _weights(w, name, size, cost):
    if w is None:
        return cost.new_full((size,), 1.0 / size)
    w = torch.as_tensor(w, device=cost.device)
    side = "N (rows)" if name == "a" else "M (columns)"
    if w.ndim == 0 or w.shape[-1] != size:
        raise RClipError(f"{name} must have shape (..., {size}): one weight per cost {side}, cost is "
                         f"{tuple(cost.shape)}; got {tuple(w.shape)}")
    sum_tol = 1e-2 if w.is_floating_point() and torch.finfo(w.dtype).bits <= 16 else 1e-4
    w = w.to(cost.dtype)
    if not torch.isfinite(w).all():
        raise RClipError(f"{name} contains NaN or inf; weights must be finite")
    if (w < 0).any():
        raise RClipError(f"{name} has negative entries (min {float(w.min()):.3g}); weights must be >= 0")
    sums = w.sum(-1, keepdim=True)
    if ((sums - 1).abs() > sum_tol).any():
        raise RClipError(f"{name} must sum to 1 per problem (over its last axis); its sums range over "
                         f"[{float(sums.min()):.6g}, {float(sums.max()):.6g}]. Normalise it: "
                         f"{name} / {name}.sum(-1, keepdim=True)")
    return w / sums
