"""Closed-form identities of the SR-flow math (Eq. 1-4) and the time samplers."""
import pytest
import torch

from flowsr import flow
from flowsr.schedules import (FastSlowSampler, NIntervalSampler, fast_grid, make_pair_sampler, sample_flow_time,
                              sample_slow, slow_grid)
from flowsr.train_step import lr_at


@pytest.fixture
def pair():
    g = torch.Generator().manual_seed(0)
    return torch.rand(3, 3, 8, 8, generator=g) * 2 - 1, torch.rand(3, 3, 8, 8, generator=g) * 2 - 1


class ScaledField:
    """The exact velocity field of every pair with LR = c * HR, as a function of (x, t) alone.

    On the path X_t = (1 + (c - 1) t) X_HR the target velocity (c - 1) X_HR equals
    v(x, t) = (c - 1) x / (1 + (c - 1) t). Unlike a constant "true velocity", this field is right
    only at the right time: a sampler that evaluates it at t_to instead of t_from, or at a time
    off by a grid step, no longer lands on HR.
    """

    def __init__(self, c: float):
        self.c = c

    def velocity(self, x_t, t, cond=None):
        t = torch.as_tensor(t, dtype=x_t.dtype).reshape(-1, *([1] * (x_t.ndim - 1)))
        return (self.c - 1) * x_t / (1 + (self.c - 1) * t)


def test_interpolate_endpoints_and_midpoint(pair):
    hr, lr = pair
    assert torch.equal(flow.interpolate(hr, lr, 0.0), hr)
    assert torch.allclose(flow.interpolate(hr, lr, 1.0), lr)
    assert torch.allclose(flow.interpolate(hr, lr, 0.5), (hr + lr) / 2)
    t = torch.tensor([0.0, 0.25, 1.0])
    out = flow.interpolate(hr, lr, t)
    assert torch.allclose(out[1], 0.75 * hr[1] + 0.25 * lr[1])


def test_velocity_is_time_derivative(pair):
    hr, lr = pair
    dt = 1e-3
    numeric = (flow.interpolate(hr, lr, 0.4 + dt) - flow.interpolate(hr, lr, 0.4)) / dt
    assert torch.allclose(numeric, flow.target_velocity(hr, lr), atol=1e-3)


def test_consistency_boundary_and_exact_origin(pair):
    hr, lr = pair
    v = torch.randn_like(hr)
    assert torch.equal(flow.consistency(hr, 0.0, v), hr)  # f(x, 0) = x
    t = torch.tensor([0.1, 0.5, 0.9])
    x_t = flow.interpolate(hr, lr, t)
    assert torch.allclose(flow.consistency(x_t, t, flow.target_velocity(hr, lr)), hr, atol=1e-6)


def test_euler_step_stays_on_the_straight_path(pair):
    hr, lr = pair
    x = flow.euler_step(flow.interpolate(hr, lr, 0.75), flow.target_velocity(hr, lr), 0.75, 0.25)
    assert torch.allclose(x, flow.interpolate(hr, lr, 0.25), atol=1e-6)


@pytest.mark.parametrize("steps", [1, 2, 4, 8])
def test_sample_with_exact_velocity_returns_hr(pair, steps):
    hr, _ = pair
    out = flow.sample(ScaledField(0.5).velocity, 0.5 * hr, steps=steps)
    assert (out - hr).abs().max() < 1e-5
    # the field is time-dependent: evaluated one step late it misses HR by a visible margin
    late = flow.sample(lambda x, t, c: ScaledField(0.5).velocity(x, t - 1 / steps), 0.5 * hr, steps=steps)
    assert (late - hr).abs().max() > 1e-2


def test_flow_math_is_fp32_under_bf16_inputs():
    """bf16 keeps 8 significant bits: 0.999 rounds to 1.0 and neighbouring slow-grid times merge.
    Interpolation, the Euler (teacher) step and f(x, t) must run in fp32 whatever x's dtype."""
    t = slow_grid(1000).float()
    zeros, ones = torch.zeros(1000, 1, 2, 2, dtype=torch.bfloat16), torch.ones(1000, 1, 2, 2, dtype=torch.bfloat16)
    x_t = flow.interpolate(zeros, ones, t)
    assert x_t.dtype == torch.float32 and x_t[:, 0, 0, 0].unique().numel() == 1000
    assert torch.equal(x_t[:, 0, 0, 0], t)
    # the teacher step of a fast-first pair (t' = 1, t = 0.999) moves x by 0.001 v
    x = torch.ones(2, 1, 2, 2, dtype=torch.bfloat16)
    v = torch.ones(2, 1, 2, 2, dtype=torch.bfloat16)
    step = flow.euler_step(x, v, torch.ones(2), torch.full((2,), 0.999))
    assert step.dtype == torch.float32 and torch.allclose(step, torch.full_like(step, 0.999), atol=1e-6)
    f = flow.consistency(x, torch.full((2,), 0.999), v)
    assert f.dtype == torch.float32 and torch.allclose(f, torch.full_like(f, 0.001), atol=1e-6)
    # sampling a bf16 LR keeps fp32 times and state
    seen = []
    flow.sample(lambda x, t, c: seen.append((x.dtype, t.dtype)) or torch.zeros_like(x), x, steps=2)
    assert seen[0][1] == torch.float32 and seen[1] == (torch.float32, torch.float32)


def test_bad_time_shape_and_steps_raise(pair):
    hr, lr = pair
    with pytest.raises(ValueError):
        flow.interpolate(hr, lr, torch.zeros(2))
    with pytest.raises(ValueError):
        flow.sample(ScaledField(0.5).velocity, lr, steps=0)


def test_grids():
    assert torch.allclose(slow_grid(1000)[[0, -1]], torch.tensor([0.001, 1.0], dtype=torch.float64))
    assert fast_grid(4).tolist() == [0.25, 0.5, 0.75, 1.0]
    t = sample_slow(10_000, 1000, torch.Generator().manual_seed(0))
    assert torch.allclose(t * 1000, (t * 1000).round(), atol=1e-3) and t.min() >= 0.001 and t.max() <= 1.0


def test_flow_time_share_at_one():
    # share 0 is the paper's uniform slow grid, draw for draw
    assert torch.equal(sample_flow_time(1000, 1000, 0.0, torch.Generator().manual_seed(3)),
                       sample_slow(1000, 1000, torch.Generator().manual_seed(3)))
    t = sample_flow_time(100_000, 1000, 0.5, torch.Generator().manual_seed(3))
    at_one = t == 1.0
    # P(t = 1) = share + (1 - share) / n_slow; the rest stays uniform on the slow grid
    assert abs(at_one.double().mean().item() - (0.5 + 0.5 / 1000)) < 0.01
    rest = t[~at_one]
    assert _on_grid(rest, 1000) and abs(rest.mean().item() - 0.5) < 0.01
    assert (sample_flow_time(50, 1000, 1.0, torch.Generator().manual_seed(3)) == 1.0).all()


def test_lr_schedules():
    assert [lr_at(s, 1.0, 4) for s in (0, 3, 100)] == [0.25, 1.0, 1.0]  # warm-up, then constant
    cos = [lr_at(s, 1.0, 4, total_steps=104, schedule="cosine", floor=0.1) for s in (0, 3, 54, 104, 200)]
    assert cos[0] == pytest.approx(0.25) and cos[1] == pytest.approx(1.0)
    assert cos[2] == pytest.approx(0.55) and cos[3] == pytest.approx(0.1) and cos[4] == pytest.approx(0.1)
    with pytest.raises(ValueError, match="lr schedule"):
        lr_at(0, 1.0, 0, schedule="linear")


def _on_grid(x, n):
    return torch.allclose(x.double() * n, (x.double() * n).round(), atol=1e-4)


@pytest.mark.parametrize("n_fast", [2, 4, 8])
def test_fast_slow_sampler(n_fast):
    pairs = FastSlowSampler(n_fast, 1000).draw(100_000, torch.Generator().manual_seed(1))
    t, tp, fast = pairs.t, pairs.t_prime, pairs.fast_first
    assert (t < tp).all()
    assert abs(fast.double().mean().item() - 0.5) < 0.01
    # fast first: t' on the fast grid, t on the slow grid within [t' - 1/n_fast, t')
    assert _on_grid(tp[fast], n_fast) and _on_grid(t[fast], 1000)
    assert (t[fast] >= tp[fast] - 1 / n_fast - 1e-6).all() and (t[fast] >= 0.001 - 1e-6).all()
    # slow first: t' on the slow grid, t the largest fast-grid point below t' (or 0)
    ts, tps = t[~fast].double(), tp[~fast].double()
    assert _on_grid(tps, 1000) and _on_grid(ts, n_fast)
    assert (ts < tps).all() and (ts + 1 / n_fast >= tps - 1e-6).all()
    assert (ts[tps <= 1 / n_fast] == 0).all()


def test_fast_slow_with_one_fast_step_is_t_prime_one():
    t, tp = FastSlowSampler(1, 1000).sample(20_000, torch.Generator().manual_seed(2))
    assert (tp == 1.0).all()
    assert _on_grid(t, 1000) and t.min() >= 0.001 - 1e-6 and t.max() <= 0.999 + 1e-6
    assert abs(t.mean().item() - 0.5) < 0.01  # uniform over the slow grid below 1


def test_n_interval_and_slow_only():
    t, tp = NIntervalSampler(18).sample(10_000, torch.Generator().manual_seed(3))
    assert torch.allclose(tp - t, torch.full_like(t, 1 / 18), atol=1e-6) and _on_grid(t, 18)
    t, tp = make_pair_sampler("slow_only").sample(100, torch.Generator().manual_seed(3))
    assert torch.allclose(tp - t, torch.full_like(t, 1e-3), atol=1e-6)
    with pytest.raises(ValueError):
        make_pair_sampler("cosine")
    with pytest.raises(ValueError):
        FastSlowSampler(0, 1000)
    with pytest.raises(ValueError, match="n_fast < n_slow"):  # the first fast step would give t == t'
        FastSlowSampler(1000, 1000)
