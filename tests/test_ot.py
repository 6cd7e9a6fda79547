"""rclip.ot.sinkhorn against POT (log-domain Sinkhorn per problem, exact EMD) and against its own identities."""
import math

import numpy as np
import ot as pot
import pytest
import torch

from rclip.errors import RClipError
from rclip.ot import sinkhorn

SIZES = [(3, 4), (5, 50), (20, 7)]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These problems are tiny: a second intra-op thread only adds latency, and on a CPU busy with another job
    each parallel kernel can wait a whole time slice for it (seen: 4 ms per exp/logsumexp instead of 20 us)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _problems(rng, batch, n, m, uniform, scale=1.0):
    """Costs in [0, scale] (1 - cosine lies in [0, 2]); Dirichlet weights, a per problem, b shared over dim 0."""
    cost = rng.uniform(0, scale, (*batch, n, m))
    if uniform:
        return cost, None, None
    a = rng.dirichlet(np.ones(n), batch)                  # (*batch, N)
    b = rng.dirichlet(np.ones(m), batch[1:])              # (*batch[1:], M): broadcast over batch[0]
    return cost, a, b


def _pot(cost, a, b, reg, i, j):
    """POT per problem (its torch backend, float64): sinkhorn2's cost and the plan from its log-potentials."""
    n, m = cost.shape[-2:]
    aij = np.full(n, 1 / n) if a is None else a[i, j]
    bj = np.full(m, 1 / m) if b is None else b[j]
    c = torch.from_numpy(cost[i, j])
    loss, log = pot.sinkhorn2(torch.from_numpy(aij), torch.from_numpy(bj), c, reg, method="sinkhorn_log",
                              numItermax=100_000, stopThr=1e-12, log=True)
    return loss.item(), torch.exp(-c / reg + log["log_u"][:, None] + log["log_v"][None, :]).numpy()


def _t(x):
    return None if x is None else torch.from_numpy(x)


@pytest.mark.parametrize("reg", [0.01, 0.05, 0.1, 0.5, 1.0])
@pytest.mark.parametrize("uniform", [True, False])
def test_batch_equals_pot_one_by_one(reg, uniform):
    """POT 0.9.7's sinkhorn2 returns sum(M * plan): the linear cost of the entropic plan, as ours does."""
    rng = np.random.default_rng(2)  # seeded problems; some draws need 10^4+ iterations at reg = 0.01
    for n, m in SIZES:
        cost, a, b = _problems(rng, (2, 2), n, m, uniform)
        res = sinkhorn(_t(cost), _t(a), _t(b), reg=reg, max_iter=100_000, tol=1e-11, return_plan=True)
        assert res.cost.shape == (2, 2) and res.plan.shape == (2, 2, n, m) and res.cost.dtype == torch.float64
        for i in range(2):
            for j in range(2):
                ref_cost, ref_plan = _pot(cost, a, b, reg, i, j)
                assert abs(res.cost[i, j].item() - ref_cost) <= 1e-8 * ref_cost, (n, m, i, j)
                np.testing.assert_allclose(res.plan[i, j].numpy(), ref_plan, rtol=0, atol=1e-10)


def test_float32_matches_pot_float64():
    """COLA's setting: float32 features, default tolerance, N = 5 views, M = 50 descriptions, reg = 0.1."""
    rng = np.random.default_rng(3)
    cost, a, b = _problems(rng, (2, 4), 5, 50, uniform=False, scale=2.0)
    res = sinkhorn(_t(cost).float(), _t(a).float(), _t(b).float(), reg=0.1)
    assert res.cost.dtype == torch.float32 and res.converged.all() and res.error.max() <= 1e-5
    ref = np.array([[_pot(cost, a, b, 0.1, i, j)[0] for j in range(4)] for i in range(2)])
    np.testing.assert_allclose(res.cost.numpy(), ref, rtol=1e-5)


def test_entropic_objective_matches_pot_solve():
    """``entropic`` = <P, C> + reg KL(P | a b^T): POT's ot.solve(..., reg_type="KL").value."""
    rng = np.random.default_rng(4)
    cost, a, b = _problems(rng, (1, 2), 6, 9, uniform=False)
    res = sinkhorn(_t(cost), _t(a), _t(b), reg=0.2, tol=1e-12)
    for j in range(2):
        ref = pot.solve(_t(cost[0, j]), _t(a[0, j]), _t(b[j]), reg=0.2, max_iter=100_000, tol=1e-13)
        assert math.isclose(res.entropic[0, j].item(), ref.value.item(), rel_tol=1e-9)
        assert math.isclose(res.cost[0, j].item(), ref.value_linear.item(), rel_tol=1e-9)


@pytest.mark.parametrize("reg", [0.001, 0.002, 0.005])
def test_small_reg_approaches_exact_emd(reg):
    """OT <= <P, C> <= entropic <= OT + reg * min(H(a), H(b)) (KL(P* | a b^T) = H(a) + H(b) - H(P*))."""
    rng = np.random.default_rng(5)
    for n, m in [(3, 4), (4, 6), (6, 5)]:
        cost, a, b = rng.uniform(0, 1, (n, m)), rng.dirichlet(np.ones(n)), rng.dirichlet(np.ones(m))
        exact = pot.emd2(a, b, cost)
        res = sinkhorn(_t(cost), _t(a), _t(b), reg=reg, max_iter=100_000, tol=1e-11)
        entropy = min(-(a * np.log(a)).sum(), -(b * np.log(b)).sum())
        assert exact - 1e-9 <= res.cost.item() <= res.entropic.item() + 1e-12 <= exact + reg * entropy + 1e-9
        assert res.cost.item() - exact <= 1e-3


def test_plan_marginals_and_error():
    rng = np.random.default_rng(6)
    cost, a, b = _problems(rng, (3, 2), 7, 11, uniform=False)
    res = sinkhorn(_t(cost), _t(a), _t(b), reg=0.05, tol=1e-10, return_plan=True)
    rows, cols = res.plan.sum(-1), res.plan.sum(-2)
    assert torch.allclose(cols, _t(b).expand_as(cols), rtol=0, atol=1e-14)       # columns exact
    row_error = (rows - _t(a)).abs().sum(-1)
    assert torch.allclose(row_error, res.error, rtol=0, atol=1e-14)              # error is the returned plan's
    assert res.error.max() <= 1e-10 and res.n_iter > 1
    assert torch.allclose(res.cost, (res.plan * _t(cost)).sum((-2, -1)), rtol=1e-15, atol=0)
    capped = sinkhorn(_t(cost), _t(a), _t(b), reg=0.05, max_iter=3)
    assert capped.n_iter == 3 and capped.error.max() > 1e-10
    assert sinkhorn(_t(cost), reg=0.05, tol=0, max_iter=17).n_iter == 17
    # values=False (a caller that needs only the plan): the same plan, error and convergence, no costs computed
    bare = sinkhorn(_t(cost), _t(a), _t(b), reg=0.05, tol=1e-10, return_plan=True, values=False)
    assert bare.cost is None and bare.entropic is None and bare.n_iter == res.n_iter
    for field in ("plan", "error", "converged"):
        assert torch.equal(getattr(bare, field), getattr(res, field)), field


def test_zero_weights_give_zero_rows_and_columns():
    """Zero-weight points carry no mass: the same cost as the problem without them, and no NaN anywhere."""
    rng = np.random.default_rng(7)
    cost = rng.uniform(0, 2, (5, 6))
    a = np.array([0.3, 0.0, 0.5, 0.2, 0.0])
    b = np.array([0.0, 0.25, 0.25, 0.0, 0.4, 0.1])
    ref = pot.sinkhorn2(a[a > 0], b[b > 0], cost[a > 0][:, b > 0], 0.1, method="sinkhorn_log", stopThr=1e-13)
    for grad in ("implicit", "unrolled"):
        c, wa, wb = (_t(x).requires_grad_() for x in (cost, a, b))
        res = sinkhorn(c, wa, wb, reg=0.1, tol=1e-12, return_plan=True, grad=grad)
        assert torch.all(res.plan[a == 0] == 0) and torch.all(res.plan[:, b == 0] == 0)
        assert math.isclose(res.cost.item(), ref, rel_tol=1e-9)
        assert torch.isfinite(res.entropic) and torch.isfinite(res.plan).all()
        grads = torch.autograd.grad(res.cost + res.entropic, (c, wa, wb))
        assert all(torch.isfinite(g).all() for g in grads), grad
        assert torch.all(grads[0][a == 0] == 0)


@pytest.mark.parametrize("grad", ["implicit", "unrolled"])
@pytest.mark.parametrize("shape", [(2, 2, 3), (2, 3, 2)])
def test_gradients_match_finite_differences(grad, shape):
    """d<P, C>/d(C, a, b) including the plan's own motion, for N < M and N > M (the implicit solve's two sides)."""
    g = torch.Generator().manual_seed(1)  # seeded: some draws need hundreds of iterations per evaluation
    c = torch.rand(shape, generator=g, dtype=torch.float64, requires_grad=True)
    a = torch.randn(shape[:2], generator=g, dtype=torch.float64).softmax(-1).requires_grad_()
    b = torch.randn(shape[2], generator=g, dtype=torch.float64).softmax(-1).requires_grad_()
    for reg in (0.05, 0.5):
        def cost(c, a, b):
            return sinkhorn(c, a, b, reg=reg, tol=1e-12, max_iter=100_000, grad=grad).cost

        def entropic(c, a, b):
            return sinkhorn(c, a, b, reg=reg, tol=1e-12, max_iter=100_000, grad=grad).entropic

        assert torch.autograd.gradcheck(cost, (c, a, b))
        assert torch.autograd.gradcheck(entropic, (c, a, b))


def test_envelope_identity_holds_for_the_entropic_objective_only():
    """d entropic/dC = P exactly (envelope theorem); d<P, C>/dC = P + <C, dP/dC> differs from P."""
    g = torch.Generator().manual_seed(9)
    c = (2 * torch.rand(3, 5, 50, generator=g, dtype=torch.float64)).requires_grad_()
    res = sinkhorn(c, reg=0.1, tol=1e-12, return_plan=True)
    d_entropic, = torch.autograd.grad(res.entropic.sum(), c, retain_graph=True)
    d_cost, = torch.autograd.grad(res.cost.sum(), c)
    assert torch.allclose(d_entropic, res.plan, rtol=0, atol=1e-12)
    assert (d_cost - res.plan).abs().max() > 0.1 * res.plan.max()
    unrolled = sinkhorn(c, reg=0.1, tol=1e-12, grad="unrolled")
    assert torch.allclose(torch.autograd.grad(unrolled.cost.sum(), c)[0], d_cost, rtol=0, atol=1e-9)


def test_shapes_dtypes_and_broadcasting():
    g = torch.Generator().manual_seed(10)
    cost = 2 * torch.rand(4, 6, generator=g)
    single = sinkhorn(cost, reg=0.1)
    assert single.cost.shape == () and single.plan is None and single.cost.dtype == torch.float32
    a = torch.randn(3, 4, generator=g).softmax(-1)                 # one cost, three source weightings
    many = sinkhorn(cost, a, reg=0.1)
    assert many.cost.shape == (3,)
    for k in range(3):
        assert torch.allclose(many.cost[k], sinkhorn(cost, a[k], reg=0.1).cost)
    half = sinkhorn(cost.half(), a.half(), reg=0.1)                # computed and returned in float32
    assert half.cost.dtype == torch.float32 and torch.allclose(half.cost, many.cost, atol=1e-2)
    assert torch.allclose(sinkhorn(cost, a, reg=0.1, grad="unrolled").cost, many.cost, rtol=1e-6, atol=0)
    assert torch.equal(sinkhorn(cost, a, reg=torch.tensor(0.1)).cost, many.cost)
    assert torch.equal(sinkhorn(cost, a, reg=np.float32(0.1)).cost, many.cost)


def test_float32_implicit_gradient_matches_unrolled():
    """COLA's float32 setting (B, K, N, M) with shared weights: both gradient modes agree w.r.t. cost and a."""
    g = torch.Generator().manual_seed(12)
    cost = (2 * torch.rand(4, 6, 5, 50, generator=g)).requires_grad_()
    a = torch.randn(4, 1, 5, generator=g).softmax(-1).requires_grad_()
    grads = []
    for grad in ("implicit", "unrolled"):
        res = sinkhorn(cost, a, reg=0.1, grad=grad)
        grads.append(torch.autograd.grad((res.cost * torch.arange(6.0)).sum(), (cost, a)))
    for implicit, unrolled in zip(*grads):
        assert torch.allclose(implicit, unrolled, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("kwargs, match", [
    (dict(cost=torch.tensor([[0.0, float("nan")], [1.0, 0.0]])), "NaN or inf"),
    (dict(cost=torch.tensor([[0.0, float("inf")], [1.0, 0.0]])), "NaN or inf"),
    (dict(a=torch.tensor([1.2, -0.2])), "negative"),
    (dict(b=torch.tensor([0.5, 0.6])), "sum to 1"),
    (dict(a=torch.tensor([2.0, 2.0])), r"a / a.sum\(-1, keepdim=True\)"),
    (dict(a=torch.tensor([0.0, 0.0])), "sum to 1"),
    (dict(a=torch.tensor([0.5, float("nan")])), "NaN or inf"),
    (dict(a=torch.full((3,), 1 / 3)), r"shape \(\.\.\., 2\)"),
    (dict(cost=torch.zeros(3, 2, 2), a=torch.full((4, 2), 0.5)), "do not broadcast"),
    (dict(cost=torch.zeros(2)), r"\(\.\.\., N, M\)"),
    (dict(reg=0.0), "reg"),
    (dict(reg=-0.1), "reg"),
    (dict(reg=float("nan")), "reg"),
    (dict(reg=None), "reg"),
    (dict(max_iter=0), "max_iter"),
    (dict(tol=-1.0), "tol"),
    (dict(grad="envelope"), "grad"),
    (dict(values=False), "return_plan=True"),
])
def test_bad_input_raises_a_helpful_error(kwargs, match):
    args = dict(cost=torch.tensor([[0.0, 1.0], [1.0, 0.0]]), a=None, b=None, reg=0.1) | kwargs
    with pytest.raises(RClipError, match=match):
        sinkhorn(args.pop("cost"), args.pop("a"), args.pop("b"), **args)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda_matches_cpu(dtype):
    g = torch.Generator().manual_seed(11)
    cost = (2 * torch.rand(8, 10, 5, 50, generator=g)).to(dtype)
    a = torch.randn(8, 1, 5, generator=g).softmax(-1).to(dtype)
    b = torch.randn(10, 50, generator=g).softmax(-1).to(dtype)
    cpu = sinkhorn(cost, a, b, reg=0.1, return_plan=True)
    c = cost.cuda().requires_grad_()
    gpu = sinkhorn(c, a.cuda(), b.cuda(), reg=0.1, return_plan=True)
    assert gpu.cost.device.type == "cuda" and gpu.cost.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    assert torch.allclose(gpu.cost.cpu(), cpu.cost, rtol=tol, atol=tol)
    assert torch.allclose(gpu.plan.cpu(), cpu.plan, rtol=0, atol=tol)
    grad, = torch.autograd.grad(gpu.cost.sum(), c)
    assert grad.device.type == "cuda" and torch.isfinite(grad).all()


@pytest.mark.parametrize("grad", ["implicit", "unrolled"])
def test_cpu_chunks_give_the_whole_batch_solution(monkeypatch, grad):
    """On the CPU a large batch is solved in chunks (rclip.ot.CPU_CHUNK_ENTRIES); chunks of 3 problems must give
    what one piece gives, POT's values, and the same gradients."""
    import rclip.ot as rot

    rng = np.random.default_rng(5)
    cost, a, b = _problems(rng, (4, 5), 6, 9, uniform=False)
    def solve():
        c = _t(cost).requires_grad_(True)
        res = sinkhorn(c, _t(a), _t(b), reg=0.05, max_iter=100_000, tol=1e-12, grad=grad)
        res.cost.sum().backward()
        return res, c.grad
    whole, g_whole = solve()
    monkeypatch.setattr(rot, "CPU_CHUNK_ENTRIES", 3 * 6 * 9)
    calls, kernel = [], rot._iterate
    monkeypatch.setattr(rot, "_iterate", lambda *args: calls.append(args[0].shape) or kernel(*args))
    chunked, g_chunked = solve()
    assert [s[0] for s in calls] == [3] * 6 + [2]                   # 20 problems in chunks of 3
    assert chunked.cost.shape == (4, 5) and chunked.error.shape == (4, 5)
    torch.testing.assert_close(chunked.cost, whole.cost, rtol=1e-10, atol=0)
    torch.testing.assert_close(g_chunked, g_whole, rtol=1e-7, atol=1e-10)
    assert abs(chunked.cost[3, 4].item() - _pot(cost, a, b, 0.05, 3, 4)[0]) <= 1e-8 * chunked.cost[3, 4].item()


def test_non_convergence_is_reported_not_hidden():
    """C / reg about 2 000 in 50 iterations: the plan violates its marginals; `error` measures the violation of the
    returned plan, `converged` is False and a warning names the remedy. The converged solve is flagged True."""
    import warnings

    rng = np.random.default_rng(11)
    cost, a, b = _problems(rng, (3,), 12, 12, uniform=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = sinkhorn(_t(cost).float(), reg=cost.max() / 2000, max_iter=50, return_plan=True)
    assert not res.converged.any()
    plan = res.plan.double()
    true = (plan.sum(-1) - 1 / 12).abs().sum(-1) + (plan.sum(-2) - 1 / 12).abs().sum(-1)
    torch.testing.assert_close(res.error.double(), true, rtol=1e-4, atol=1e-6)
    assert any("did not converge" in str(w.message) and "larger reg" in str(w.message) for w in caught)
    ok = sinkhorn(_t(cost), reg=0.1, max_iter=10_000)
    assert ok.converged.all()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_kernel_domain_gives_the_log_domain_plan_pot_values_and_gradients(dtype):
    """domain="kernel" iterates scalings on exp(-C / reg): the plan, cost and implicit gradients of the log domain
    (and POT's values), zero-weight points included."""
    rng = np.random.default_rng(11)
    cost, a, b = _problems(rng, (3, 4), 7, 5, uniform=False, scale=2.0)
    a[0, 0, 2], b[1, 3] = 0.0, 0.0
    a, b = a / a.sum(-1, keepdims=True), b / b.sum(-1, keepdims=True)
    tol = 1e-11 if dtype == torch.float64 else 1e-6
    out = {}
    for domain in ("log", "kernel"):
        c = _t(cost).to(dtype).requires_grad_(True)
        res = sinkhorn(c, _t(a).to(dtype), _t(b).to(dtype), reg=0.1, max_iter=100_000, tol=tol, return_plan=True,
                       domain=domain)
        res.cost.sum().backward()
        out[domain] = res, c.grad
    (log, g_log), (ker, g_ker) = out["log"], out["kernel"]
    assert bool(ker.converged.all()) and torch.isfinite(ker.plan).all()
    assert torch.all(ker.plan[0, 0, 2] == 0) and torch.all(ker.plan[:, 1, :, 3] == 0)
    close = dict(rtol=1e-9, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(ker.plan, log.plan, **close)
    torch.testing.assert_close(ker.cost, log.cost, **close)
    torch.testing.assert_close(g_ker, g_log, **close)
    for i, j in [(0, 0), (1, 3), (2, 1)]:
        assert abs(ker.cost[i, j].item() - _pot(cost, a, b, 0.1, i, j)[0]) <= (1e-8 if dtype == torch.float64
                                                                               else 1e-5)


def test_kernel_domain_refuses_an_underflowing_kernel_and_auto_falls_back(monkeypatch):
    import rclip.ot as rot

    rng = np.random.default_rng(12)
    cost = _t(rng.uniform(0, 2, (4, 6, 5))).float()
    with pytest.raises(RClipError, match="domain='kernel' needs"):
        sinkhorn(cost, reg=0.01, domain="kernel")                   # range / reg = 200 > 50: exp underflows
    with pytest.raises(RClipError, match="domain='kernel' needs"):
        sinkhorn(cost, reg=0.1, domain="kernel", grad="unrolled")
    with pytest.raises(RClipError, match="domain must be"):
        sinkhorn(cost, reg=0.1, domain="exp")
    used = []
    for name in ("_iterate", "_iterate_kernel"):
        fn = getattr(rot, name)
        monkeypatch.setattr(rot, name, lambda *args, _f=fn, _n=name: used.append(_n) or _f(*args))
    small = sinkhorn(cost, reg=0.01, max_iter=20_000, domain="auto")
    assert used == ["_iterate"] and bool(small.converged.all())
    torch.testing.assert_close(small.cost, sinkhorn(cost, reg=0.01, max_iter=20_000).cost)
    used.clear()
    sinkhorn(cost, reg=0.1, domain="auto")
    assert used == ["_iterate_kernel"]


@pytest.mark.parametrize("domain", ["log", "kernel"])
def test_plan_without_a_gradient_is_the_tracked_plan_to_the_bit(monkeypatch, domain):
    """With nothing to differentiate, the log-sum-exps run in one scratch buffer and the plan is written over
    -C / reg a block of rows at a time (fusion's 3 072 x 3 072 plans): the same plan, error, iterations and values,
    to the bit, as the path autograd takes (torch.logsumexp, then exp(α ⊕ β - C / reg) at full size). Zero-weight
    rows included; several row blocks per problem."""
    import rclip.ot as rot

    rng = np.random.default_rng(9)
    cost, a, b = _problems(rng, (3, 2), 40, 33, uniform=False, scale=2.0)
    a[1, 0, :4] = 0
    a /= a.sum(-1, keepdims=True)
    monkeypatch.setattr(rot, "CPU_CHUNK_ENTRIES", 200)
    for dtype in (torch.float32, torch.float64):
        c, wa, wb = (_t(x).to(dtype) for x in (cost, a, b))
        plain = sinkhorn(c, wa, wb, reg=0.1, return_plan=True, domain=domain)
        tracked = sinkhorn(c.clone().requires_grad_(True), wa, wb, reg=0.1, return_plan=True, domain=domain)
        assert plain.plan.grad_fn is None and tracked.plan.grad_fn is not None
        assert torch.equal(plain.plan, tracked.plan.detach()) and plain.n_iter == tracked.n_iter
        for field in ("cost", "entropic", "error", "converged"):
            assert torch.equal(getattr(plain, field), getattr(tracked, field).detach()), (dtype, field)
        assert (plain.plan[1, 0, :4] == 0).all()
    if domain == "log":              # grad="unrolled" iterates with torch.logsumexp itself: the same iterates
        c = _t(cost).float().requires_grad_(True)
        unrolled = sinkhorn(c, _t(a).float(), _t(b).float(), reg=0.1, return_plan=True, grad="unrolled")
        plain = sinkhorn(c.detach(), _t(a).float(), _t(b).float(), reg=0.1, return_plan=True)
        assert torch.equal(unrolled.plan.detach(), plain.plan) and unrolled.n_iter == plain.n_iter


def test_shifted_logsumexp_is_torchs_to_the_bit():
    from rclip.ot import _logsumexp_shifted

    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 50, 70, generator=g) * 20
    for dim, shift in ((-2, torch.randn(3, 50, 1, generator=g) * 5), (-1, torch.randn(3, 1, 70, generator=g))):
        shift[0, :3] = -math.inf                       # rows or columns of zero weight
        x[2, :, :3] = -math.inf                        # and a block that is -inf throughout
        out = _logsumexp_shifted(x, shift, dim, torch.empty_like(x))
        assert torch.equal(out, torch.logsumexp(x + shift, dim)), dim


def test_marginals_of_a_large_plan_are_summed_in_blocks_in_float64(monkeypatch):
    """A plan above CPU_CHUNK_ENTRIES is summed a block of rows at a time (no float64 copy of the whole plan):
    rows to the bit of the whole-plan float64 sums, columns to float64 rounding."""
    import rclip.ot as rot

    plan = torch.rand(2, 300, 170, generator=torch.Generator().manual_seed(1)) ** 6 / 170
    whole = plan.double()
    monkeypatch.setattr(rot, "CPU_CHUNK_ENTRIES", 1000)          # blocks of 5 rows
    rows, cols = rot._marginals(plan)
    assert rows.dtype == cols.dtype == torch.float64
    assert torch.equal(rows, whole.sum(-1))
    torch.testing.assert_close(cols, whole.sum(-2), rtol=1e-14, atol=0)
