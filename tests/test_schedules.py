"""ctxjax.schedules: SkyLadder windows (plain Python, on the host) against an independent
float64 / exact-integer NumPy reference, and the learning-rate schedules against their closed
forms. (That a new window never recompiles the train step is tests/test_train.py's.)"""
import fractions
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from ctxjax import schedules
from ctxjax.config import get_config

KINDS = schedules.WINDOW_KINDS
SEED = np.random.SeedSequence().entropy  # fresh draws each run; printed on failure


def _rng(*salt):
    return np.random.default_rng([SEED % 2**63, *salt])


def reference_windows(t, *, final, start, kind, climb, rate, step_size=None, multiple_of=None):
    """The SkyLadder window at integer steps t, written from the formulas in float64, with the
    linear climb start + floor(rate * t) in exact integer arithmetic (rate a Fraction).

    Also returns `near`: steps whose continuous value lies so close to an integer that float32
    rounding may legitimately floor it the other way (only for the transcendental kinds).
    """
    t = np.asarray(t, np.int64)
    tc = np.minimum(t, climb)
    span = final - start
    near = np.zeros(t.shape, bool)
    if kind in ("linear", "stepwise"):
        w = start + tc * rate.numerator // rate.denominator
    else:
        u = tc / climb
        if kind == "sinusoidal":
            x = start + span * np.sin(np.pi / 2 * u)
        elif kind == "cosine":
            x = start + span * (1 - np.cos(np.pi * u)) / 2
        elif kind == "exponential":
            x = start * (final / start) ** u
        else:
            x = start * (final / start) ** (np.log1p(tc) / np.log1p(climb))
        w = np.floor(x).astype(np.int64)
        near = (np.abs(x - np.round(x)) < 4e-6 * final) & (t < climb)
    w = np.clip(w, start, final)
    for m in (step_size, multiple_of):
        if m:  # largest multiple of m not above w, but never below start; final stays final
            w = np.where(w >= final, final, np.maximum(start, w - w % m))
    return np.where(t >= climb, final, w), near


def _windows(steps, **kw):
    return np.array([schedules.skyladder_window(int(s), **kw) for s in steps])


def _steps(climb, rng, n=3000):
    """Every step of a short climb, else a random sample, plus the edges and far-away steps."""
    if climb <= n:
        body = np.arange(climb)
    else:
        body = np.unique(np.concatenate([np.arange(200), rng.integers(0, climb, n)]))
    edges = np.array([max(climb - 2, 0), max(climb - 1, 0), climb, climb + 1, 10 * climb + 7, 2**31 - 1])
    return np.unique(np.concatenate([body, edges]))


def _check_properties(w, steps, *, final, start, climb, multiple=None):
    assert np.all(np.diff(w) >= 0), "window must never shrink"
    assert w.min() >= start and w.max() <= final
    assert w[steps == 0][0] >= start and np.all(w[steps >= climb] == final)
    assert np.all(w[steps < climb] < final), "the full window comes only at the end of the climb"
    if multiple:
        inside = (w != final) & (w != start)
        assert np.all(w[inside] % multiple == 0)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("form", ["alpha", "climb_fraction"])
def test_window_kinds_match_reference(kind, form):
    rng = _rng(KINDS.index(kind), form == "alpha")
    final = int(rng.choice([256, 1024, 4096]))
    start = int(rng.choice([8, 16, 32, 48]))
    multiple_of = int(rng.choice([16, 64, 128])) if rng.random() < 0.5 else None
    step_size = int(rng.choice([64, 256])) if kind == "stepwise" else None
    kw = dict(final=final, start=start, kind=kind, multiple_of=multiple_of, step_size=step_size)
    if form == "alpha":
        alpha = fractions.Fraction(*[(1, 8), (1, 4), (3, 10), (1, 1), (5, 2)][rng.integers(5)])
        kw["alpha"] = float(alpha)
        climb = math.ceil((final - start) / alpha)
        rate = alpha
    else:
        total = int(rng.integers(500, 20000))
        frac = float(rng.choice([0.1, 0.33, 0.7, 1.0]))
        kw.update(climb_fraction=frac, total_steps=total)
        climb = round(frac * total)
        rate = fractions.Fraction(final - start, climb)
    steps = _steps(climb, rng)
    got = _windows(steps, **kw)
    want, near = reference_windows(steps, final=final, start=start, kind=kind, climb=climb, rate=rate,
                                   step_size=step_size, multiple_of=multiple_of)
    bad = (got != want) & ~near
    assert not bad.any(), (f"seed={SEED} {kw}: steps {steps[bad][:5]} got {got[bad][:5]} "
                           f"want {want[bad][:5]}")
    # Exact-integer points (cosine at u = 1/3, 1/2, 2/3, ...) may floor either way in float32; a
    # few such flips are legitimate on a short climb, a systematic drift is not.
    flips = int((got != want).sum())
    assert flips <= max(4, 0.02 * len(steps)), f"seed={SEED} {kw}: {flips} float32 boundary flips"
    _check_properties(got, steps, final=final, start=start, climb=climb,
                      multiple=multiple_of or step_size)


def test_linear_is_exactly_start_plus_floor_alpha_t():
    # w(t) = min(L, w_s + floor(alpha * t)), exactly, at every step and far beyond the climb.
    rng = _rng(100)
    for alpha in (fractions.Fraction(1, 8), fractions.Fraction(1, 3), fractions.Fraction(7, 4)):
        final, start = int(rng.integers(300, 3000)), int(rng.integers(1, 64))
        steps = np.concatenate([np.arange(40000), rng.integers(0, 2**31 - 1, 1000)])
        got = _windows(steps, final=final, start=start, alpha=float(alpha))
        want = np.minimum(final, start + steps.astype(np.int64) * alpha.numerator // alpha.denominator)
        np.testing.assert_array_equal(got, want, err_msg=f"seed={SEED} alpha={alpha}")
    # 128K context over 1M steps: a float32 floor alone is off by one at ~0.6% of these steps.
    steps = rng.integers(0, 10**6, 20000)
    got = _windows(steps, final=131072, start=32, climb_fraction=1.0, total_steps=10**6)
    np.testing.assert_array_equal(got, 32 + steps * (131072 - 32) // 10**6, err_msg=f"seed={SEED}")
    # The paper's default: 32 -> 8192 at 1/8 token per step reaches 8K at step 65280.
    assert schedules.skyladder_window(65279, final=8192) == 8191
    assert schedules.skyladder_window(65280, final=8192) == 8192


@pytest.mark.parametrize("kind", KINDS)
def test_climb_fraction_reaches_final_exactly_then(kind):
    for frac, total, reach in [(0.7, 1000, 700), (0.25, 4000, 1000), (1.0, 300, 300), (0.33, 1000, 330)]:
        kw = dict(final=2048, start=32, kind=kind, climb_fraction=frac, total_steps=total, multiple_of=64)
        before, at, after = (schedules.skyladder_window(s, **kw) for s in (reach - 1, reach, total))
        assert before < 2048 and at == 2048 and after == 2048, (kind, frac, total, before)


@pytest.mark.parametrize("kind", KINDS)
def test_windows_are_python_ints(kind):
    kw = dict(final=512, start=16, kind=kind, alpha=0.5)
    for step in (0, 7, 10**6, np.int64(5)):
        assert type(schedules.skyladder_window(step, **kw)) is int


def _sky(**changes):
    cfg = get_config().skyladder
    cfg.update(changes)
    return cfg


def test_make_window_schedule():
    window_at = schedules.make_window_schedule(_sky(), seq_len=512, total_steps=100)
    assert window_at(0, 512) is None and window_at(99, 512) is None  # no window term at all
    # Disabled: the schedule's knobs are not checked (start=32 > seq_len=16 is fine).
    assert schedules.make_window_schedule(_sky(), seq_len=16, total_steps=100)(3, 16) is None
    constant = schedules.make_window_schedule(_sky(constant_window=128), seq_len=512, total_steps=100)
    assert constant(0, 512) == constant(10**6, 512) == 128
    assert constant(5, 128) is None  # a window covering the whole row is no window term
    sched = schedules.make_window_schedule(
        _sky(enabled=True, kind="sinusoidal", climb_fraction=0.5, multiple_of=32, start=64),
        seq_len=1024, total_steps=400)
    kw = dict(final=1024, start=64, kind="sinusoidal", climb_fraction=0.5, total_steps=400, multiple_of=32)
    for s in (0, 13, 99, 150, 199):
        assert sched(s, 1024) == schedules.skyladder_window(s, **kw)
    assert sched(199, 1024) < 1024 and sched(200, 1024) is None  # the climb is over: full attention
    assert sched(13, 64) is None  # a curriculum stage shorter than the window


@pytest.mark.parametrize("changes, match", [
    (dict(enabled=True, kind="quadratic"), "skyladder.kind='quadratic'.*linear, sinusoidal"),
    (dict(enabled=True, start=0), "skyladder.start=0"),
    (dict(enabled=True, start=1024), r"skyladder.start=1024.*seq_len=512"),
    (dict(enabled=True, alpha=-1.0), "skyladder.alpha=-1.0"),
    (dict(enabled=True, climb_fraction=0.0), "skyladder.climb_fraction=0.0"),
    (dict(enabled=True, climb_fraction=1.5), r"skyladder.climb_fraction=1.5.*\(0, 1\]"),
    (dict(enabled=True, multiple_of=0), "skyladder.multiple_of=0"),
    (dict(enabled=True, step_size=128), "skyladder.step_size=128.*stepwise"),
    (dict(enabled=True, mask="diagonal"), "skyladder.mask='diagonal'.*'chunk'"),
    (dict(enabled=True, constant_window=64), "constant_window=64.*enabled=True"),
    (dict(constant_window=1000), r"constant_window=1000.*seq_len=512"),
])
def test_window_config_errors_name_the_key(changes, match):
    with pytest.raises(ValueError, match=match):
        schedules.make_window_schedule(_sky(**changes), seq_len=512, total_steps=1000)


def test_window_errors():
    with pytest.raises(ValueError, match="skyladder.startt"):
        schedules.make_window_schedule(ml_collections.ConfigDict(dict(enabled=True, startt=3)),
                                       seq_len=64, total_steps=10)
    with pytest.raises(ValueError, match="total_steps=None.*climb_fraction"):
        schedules.skyladder_window(3, final=64, climb_fraction=0.5)
    with pytest.raises(ValueError, match="final=0"):
        schedules.skyladder_window(3, final=0)
    with pytest.raises(ValueError, match="step=-1"):
        schedules.skyladder_window(-1, final=64)
    with pytest.raises(ValueError, match="step=3.0 must be an integer"):
        schedules.skyladder_window(3.0, final=64)


# ---------------------------------------------------------------------------------------
# Learning-rate schedules
# ---------------------------------------------------------------------------------------

def _optim(**changes):
    cfg = get_config().optim
    cfg.update(changes)
    return cfg


def reference_lr(t, *, lr, warmup, total, schedule, min_ratio, decay_fraction=None, shape=None):
    lo = min_ratio * lr
    if t < warmup:
        return lr * t / warmup
    if schedule == "constant":
        return lr
    if schedule == "cosine":
        p = min(t - warmup, total - warmup) / (total - warmup)
        return lo + (lr - lo) * 0.5 * (1 + math.cos(math.pi * p))
    decay = max(1, round(decay_fraction * total))
    if t < total - decay:
        return lr
    p = min((t - (total - decay)) / decay, 1.0)
    return lo + (lr - lo) * ((1 - p) if shape == "linear" else (1 - math.sqrt(p)))


@pytest.mark.parametrize("schedule, shape", [("cosine", None), ("wsd", "linear"), ("wsd", "1-sqrt"),
                                             ("constant", None)])
def test_lr_schedules_match_closed_forms(schedule, shape):
    rng = _rng(400, schedules.LR_SCHEDULES.index(schedule), shape == "linear")
    for warmup in (0, int(rng.integers(1, 200))):
        total = int(rng.integers(1000, 5000))
        lr, min_ratio = float(rng.uniform(1e-4, 3e-3)), float(rng.uniform(0.0, 0.3))
        frac = float(rng.uniform(0.1, 0.4))
        cfg = _optim(lr=lr, warmup_steps=warmup, schedule=schedule, min_lr_ratio=min_ratio,
                     decay_fraction=frac, decay_shape=shape or "linear")
        fn = schedules.make_lr_schedule(cfg, total)
        decay_start = total - round(frac * total)
        steps = np.array(sorted({0, 1, warmup // 2, max(warmup - 1, 0), warmup, warmup + 1, total // 2,
                                 decay_start - 1, decay_start, decay_start + 7, total - 1, total,
                                 total + 100, *rng.integers(0, total, 20)}))
        want = np.array([reference_lr(int(t), lr=lr, warmup=warmup, total=total, schedule=schedule,
                                      min_ratio=min_ratio, decay_fraction=frac, shape=shape)
                         for t in steps])
        got = np.asarray(jax.jit(jax.vmap(fn))(jnp.asarray(steps, jnp.int32)))  # a traced count
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-6 * lr,
                                   err_msg=f"seed={SEED} {schedule} {shape} warmup={warmup} steps={steps}")
        # A plain Python int count works too.
        np.testing.assert_allclose(float(fn(int(steps[-3]))), want[-3], rtol=2e-5, atol=1e-6 * lr)


@pytest.mark.parametrize("changes, total, match", [
    (dict(schedule="linear"), 1000, "optim.schedule='linear'.*cosine, wsd, constant"),
    (dict(lr=-1e-3), 1000, "optim.lr=-0.001 must be > 0"),
    (dict(lr=0.0), 1000, "optim.lr=0.0"),
    (dict(warmup_steps=1000), 1000, r"optim.warmup_steps=1000.*total_steps=1000"),
    (dict(warmup_steps=-5), 1000, "optim.warmup_steps=-5"),
    (dict(eps=0.0), 1000, "optim.eps=0.0"),
    (dict(b2=1.0), 1000, "optim.b2=1.0"),
    (dict(grad_accum_steps=0), 1000, "optim.grad_accum_steps=0"),
    (dict(decay_shape="sqrt"), 1000, "optim.decay_shape='sqrt'.*1-sqrt"),
    (dict(min_lr_ratio=2.0), 1000, "optim.min_lr_ratio=2.0"),
    (dict(schedule="wsd", warmup_steps=900, decay_fraction=0.2), 1000, "overlaps the wsd decay.*800"),
    (dict(), 0, "total_steps=0"),
])
def test_lr_config_errors_name_the_key(changes, total, match):
    with pytest.raises(ValueError, match=match):
        schedules.make_lr_schedule(_optim(**changes), total)


def test_lr_unknown_key():
    with pytest.raises(ValueError, match="optim.learning_rate"):
        schedules.make_lr_schedule(ml_collections.ConfigDict(dict(learning_rate=1e-3)), 100)
    assert float(schedules.make_lr_schedule(ml_collections.ConfigDict(dict(lr=1e-3, warmup_steps=0,
                                                                            schedule="constant")), 10)(3)) \
        == pytest.approx(1e-3)
