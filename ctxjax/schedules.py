"""Schedules: SkyLadder context-window schedules and learning-rate schedules.

SkyLadder (Zhu et al. 2025, "SkyLadder: Better and Faster Pretraining via Context Window
Scheduling", arXiv:2503.15450, code at github.com/sail-sg/SkyLadder) pretrains with a short
attention window w that grows to the full context length L:

    linear:       w(t) = min(L, w_s + floor(alpha * t))

The climb takes T steps: T = ceil((L - w_s) / alpha), or T = round(climb_fraction * total_steps)
when a fraction of training is given instead of alpha. With u = t / T, the other shapes (from
the paper and its code) are

    sinusoidal:   w_s + floor((L - w_s) * sin(pi/2 * u))
    cosine:       w_s + floor((L - w_s) * (1 - cos(pi * u)) / 2)   (the released code lacks
                  the /2, so its cosine reaches L halfway; here every shape ends at step T)
    exponential:  floor(w_s * (L / w_s) ** u)
    logarithmic:  floor(w_s * (L / w_s) ** (log(1 + t) / log(1 + T)))
    stepwise:     the linear ramp rounded down to multiples of step_size (the code's `inc1024`)

and w(t) = L from step T on. `multiple_of` then rounds any of them down to a multiple (for
kernel tiles), never below w_s and never above L.

The window is computed on the host in plain Python, once per step, and enters the compiled
train step as a traced int32 scalar, so a new window never recompiles; once the window covers
the whole row, the step runs without a window term (see `make_window_schedule`).

The learning-rate schedules are optax's own builders: warmup + cosine, warmup-stable-decay
(WSD, Hägele et al. 2024, with a linear or 1-sqrt cooldown) and warmup + constant.
"""
from __future__ import annotations

import fractions
import math
from typing import Any, Callable, Mapping, NamedTuple

import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from ctxjax.model.config import WINDOW_MASKS

WINDOW_KINDS = ("linear", "sinusoidal", "exponential", "cosine", "logarithmic", "stepwise")
LR_SCHEDULES = ("cosine", "wsd", "constant")
DECAY_SHAPES = ("linear", "1-sqrt")

_MAX_FINAL = 1 << 22
_MAX_CLIMB = 1 << 30
_MAX_ALPHA_DENOMINATOR = 1 << 20


# ----------------------------------------------------------------------------------------
# SkyLadder window schedules
# ----------------------------------------------------------------------------------------

class _WindowPlan(NamedTuple):
    """A validated window schedule, all Python ints, so it can be a static jit argument."""
    kind: str
    start: int
    final: int
    climb_steps: int   # T: the window is `final` from step T on
    rate_num: int      # the linear climb per step, (final - start) / T or alpha, as num / den
    rate_den: int
    step_size: int     # kind='stepwise' only, else 0
    multiple_of: int   # 1 = no rounding


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _is_number(value) -> bool:
    return (_is_int(value) or isinstance(value, (float, np.floating, fractions.Fraction))) and \
        math.isfinite(value)


def _window_plan(*, final, start, alpha, kind, climb_fraction, total_steps, multiple_of,
                 step_size, names: Mapping[str, str] | None = None) -> _WindowPlan:
    """Checks the arguments of a window schedule and resolves them to a _WindowPlan."""
    names = names or {}

    def fail(key, value, fix):
        return ValueError(f"SkyLadder: {names.get(key, key)}={value!r} {fix}")

    if not _is_int(final) or not 1 <= final <= _MAX_FINAL:
        raise fail("final", final, f"must be an integer in [1, {_MAX_FINAL}]: the full window, "
                                   "i.e. the training sequence length.")
    final = int(final)
    if not _is_int(start) or not 1 <= start <= final:
        raise fail("start", start, f"must be an integer in [1, {names.get('final', 'final')}={final}]: "
                                   "the first window (the paper uses 32).")
    start = int(start)
    if kind not in WINDOW_KINDS:
        raise fail("kind", kind, f"is not a window schedule; use one of {', '.join(WINDOW_KINDS)}.")
    span = final - start

    if climb_fraction is not None:
        if not _is_number(climb_fraction) or not 0 < climb_fraction <= 1:
            raise fail("climb_fraction", climb_fraction, "must be in (0, 1]: the fraction of training "
                       "spent climbing (or None to climb at rate alpha).")
        if not _is_int(total_steps) or total_steps < 1:
            raise fail("total_steps", total_steps, "must be an integer >= 1 when climb_fraction is "
                       "set: pass the number of training steps.")
        climb = max(1, round(climb_fraction * total_steps))
        rate_num, rate_den = span, climb
    else:
        if not _is_number(alpha) or not 0 < alpha <= final:
            raise fail("alpha", alpha, f"must be a number in (0, {final}]: tokens added to the window "
                       "per step (the paper uses 1/8), or set climb_fraction instead.")
        rate = fractions.Fraction(alpha).limit_denominator(_MAX_ALPHA_DENOMINATOR)
        if rate == 0:
            raise fail("alpha", alpha, f"is too small; use alpha >= 1/{_MAX_ALPHA_DENOMINATOR}.")
        rate_num, rate_den = rate.numerator, rate.denominator
        climb = -(-span * rate_den // rate_num)   # first t with floor(alpha * t) >= span
    if span == 0:
        climb = 0                                 # start == final: nothing to climb
    if climb >= _MAX_CLIMB:
        raise fail("alpha", alpha, f"makes the climb take {climb} steps (limit {_MAX_CLIMB}); "
                   "raise alpha or set climb_fraction.")

    if step_size is not None and kind != "stepwise":
        raise fail("step_size", step_size, f"only applies to kind='stepwise' (kind is {kind!r}); "
                   "set it to None, or use multiple_of to round any kind.")
    if kind == "stepwise":
        step_size = max(1, final // 8) if step_size is None else step_size
        if not _is_int(step_size) or not 1 <= step_size <= final:
            raise fail("step_size", step_size, f"must be an integer in [1, {final}]: the jump of "
                       "the stepwise window in tokens.")
    if multiple_of is not None and (not _is_int(multiple_of) or not 1 <= multiple_of <= final):
        raise fail("multiple_of", multiple_of, f"must be an integer in [1, {final}] (or None for "
                   "no rounding): round the window down to a multiple of it.")
    return _WindowPlan(kind=kind, start=start, final=final, climb_steps=int(climb),
                       rate_num=int(rate_num), rate_den=int(rate_den), step_size=int(step_size or 0),
                       multiple_of=int(multiple_of or 1))


def _window(step: int, plan: _WindowPlan) -> int:
    """The window at integer `step`: exact integers for the linear climb, float64 otherwise."""
    start, final, climb = plan.start, plan.final, plan.climb_steps
    if climb == 0 or step >= climb:
        return final
    t, span = step, final - start
    u = t / climb
    if plan.kind in ("linear", "stepwise"):
        w = start + t * plan.rate_num // plan.rate_den
    elif plan.kind == "sinusoidal":
        w = start + math.floor(span * math.sin(math.pi / 2 * u))
    elif plan.kind == "cosine":
        w = start + math.floor(span * (1 - math.cos(math.pi * u)) / 2)
    elif plan.kind == "exponential":
        w = math.floor(start * (final / start) ** u)
    else:  # logarithmic
        w = math.floor(start * (final / start) ** (math.log1p(t) / math.log1p(climb)))
    # Before step T every shape is below `final` in exact arithmetic; rounding can reach it
    # a step early on the flat top of sinusoidal/cosine, so clip to final - 1.
    w = min(max(int(w), start), final - 1)
    for multiple in (plan.step_size, plan.multiple_of):
        if multiple > 1:
            w = max(start, w - w % multiple)
    return w


def skyladder_window(step, *, final: int, start: int = 32, alpha: float = 1 / 8,
                     kind: str = "linear", climb_fraction: float | None = None,
                     total_steps: int | None = None, multiple_of: int | None = None,
                     step_size: int | None = None):
    """The SkyLadder attention window at `step` (see the module docstring for the formulas).

    Args:
      step: the training step, an int >= 0.
      final: the full window L, normally the training sequence length.
      start: the first window w_s (the paper uses 32).
      alpha: tokens added per step: the linear schedule is min(L, w_s + floor(alpha * t));
        the other kinds climb for ceil((L - w_s) / alpha) steps. alpha is read as the nearest
        fraction with denominator <= 2**20 (0.3 is 3/10), and the linear floor is exact.
      kind: 'linear', 'sinusoidal', 'exponential', 'cosine', 'logarithmic' or 'stepwise'.
      climb_fraction: instead of alpha, climb for round(climb_fraction * total_steps) steps.
      total_steps: the number of training steps (needed with climb_fraction).
      multiple_of: round the window down to a multiple of this, never below start or above final.
      step_size: kind='stepwise' only: the jump in tokens (default final // 8).
    """
    plan = _window_plan(final=final, start=start, alpha=alpha, kind=kind,
                        climb_fraction=climb_fraction, total_steps=total_steps,
                        multiple_of=multiple_of, step_size=step_size)
    return _window(_check_step(step), plan)


def _check_step(step) -> int:
    if not _is_int(step) or not 0 <= step < 2**31:
        raise ValueError(f"SkyLadder: step={step!r} must be an integer in [0, 2**31).")
    return int(step)


def _section(cfg, name: str) -> dict[str, Any]:
    """A config section as a dict, the defaults of ctxjax/config.py filled in; an unknown key
    is an error."""
    from ctxjax.config import get_config
    defaults = get_config()[name]
    given = cfg.to_dict() if isinstance(cfg, ml_collections.ConfigDict) else dict(cfg)
    unknown = sorted(set(given) - set(defaults.keys()))
    if unknown:
        raise ValueError(f"Unknown config key(s) {', '.join(f'{name}.{k}' for k in unknown)}; "
                         f"the {name} section has: {', '.join(sorted(defaults.keys()))}.")
    return {**defaults.to_dict(), **given}


def make_window_schedule(sky_cfg, *, seq_len: int, total_steps: int) -> Callable[[int, int], int | None]:
    """`window_at(step, row_len)` from the `config.skyladder` section: the attention window of
    the global layers at `step` for rows of `row_len` tokens, or None when no window applies
    (SkyLadder off and no constant_window, or a window that covers the whole row), so the
    layers then run without a window term. Plain Python ints, computed on the host.

    The knobs in use are checked here (ctxjax/config.py calls this before a run writes
    anything); the schedule's knobs are not checked while enabled=False.
    """
    c = _section(sky_cfg, "skyladder")
    names = {k: f"skyladder.{k}" for k in c}
    names.update(final="seq_len", total_steps="total_steps")
    if c["mask"] not in WINDOW_MASKS:
        raise ValueError(f"SkyLadder: skyladder.mask={c['mask']!r} is not a window mask; use "
                         "'chunk' (block-wise, as in the paper) or 'sliding'.")
    if not isinstance(c["enabled"], bool):
        raise ValueError(f"SkyLadder: skyladder.enabled={c['enabled']!r} must be True or False.")
    constant = c["constant_window"]
    if c["enabled"]:
        if constant is not None:
            raise ValueError(f"SkyLadder: skyladder.constant_window={constant!r} is set together "
                             "with skyladder.enabled=True; set constant_window=None to schedule "
                             "the window, or enabled=False for the constant-window baseline.")
        plan = _window_plan(final=seq_len, start=c["start"], alpha=c["alpha"], kind=c["kind"],
                            climb_fraction=c["climb_fraction"], total_steps=total_steps,
                            multiple_of=c["multiple_of"], step_size=c["step_size"], names=names)
    elif constant is None:
        return lambda step, row_len: None
    elif not _is_int(constant) or not 1 <= constant <= seq_len:
        raise ValueError(f"SkyLadder: skyladder.constant_window={constant!r} must be an integer in "
                         f"[1, seq_len={seq_len}] (or None for no window term).")
    else:
        plan = _WindowPlan("linear", int(constant), int(constant), 0, 0, 1, 0, 1)

    def window_at(step: int, row_len: int) -> int | None:
        window = _window(_check_step(step), plan)
        return window if window < row_len else None

    return window_at


# ----------------------------------------------------------------------------------------
# Learning-rate schedules
# ----------------------------------------------------------------------------------------

def _check_optim(c: dict[str, Any], total_steps) -> None:
    def require(key, ok, fix):
        if not ok:
            raise ValueError(f"optim.{key}={c[key]!r} {fix}")

    if not _is_int(total_steps) or total_steps < 1:
        raise ValueError(f"total_steps={total_steps!r} must be an integer >= 1 (the number of "
                         "optimizer steps to train).")

    def within(key, low, high=math.inf, *, open_low=False, open_high=False):
        v = c[key]
        return (_is_number(v) and (low < v if open_low else low <= v)
                and (v < high if open_high else v <= high))

    require("lr", within("lr", 0, open_low=True), "must be > 0: the peak learning rate, e.g. 3e-4.")
    require("warmup_steps", _is_int(c["warmup_steps"]) and 0 <= c["warmup_steps"] < total_steps,
            f"must be an integer in [0, total_steps={total_steps}); lower it or train longer.")
    require("schedule", c["schedule"] in LR_SCHEDULES,
            f"is not a learning-rate schedule; use one of {', '.join(LR_SCHEDULES)}.")
    require("decay_fraction", within("decay_fraction", 0, 1, open_low=True),
            "must be in (0, 1]: the share of training spent decaying (wsd).")
    require("decay_shape", c["decay_shape"] in DECAY_SHAPES,
            "is not a decay shape; use 'linear' or '1-sqrt'.")
    require("min_lr_ratio", within("min_lr_ratio", 0, 1),
            "must be in [0, 1]: the final learning rate as a fraction of lr.")
    require("b1", within("b1", 0, 1, open_high=True), "must be in [0, 1), e.g. 0.9.")
    require("b2", within("b2", 0, 1, open_high=True), "must be in [0, 1), e.g. 0.95.")
    require("eps", within("eps", 0, open_low=True), "must be > 0, e.g. 1e-8.")
    require("weight_decay", within("weight_decay", 0), "must be >= 0 (0 = no weight decay).")
    require("grad_clip_norm", within("grad_clip_norm", 0), "must be >= 0 (0 = no clipping).")
    require("grad_accum_steps", _is_int(c["grad_accum_steps"]) and c["grad_accum_steps"] >= 1,
            "must be an integer >= 1: micro-batches per optimizer step.")
    require("z_loss", within("z_loss", 0), "must be >= 0 (0 = off; PaLM uses 1e-4).")
    if c["schedule"] == "wsd":
        decay_start = total_steps - max(1, round(c["decay_fraction"] * total_steps))
        require("warmup_steps", c["warmup_steps"] <= decay_start,
                f"overlaps the wsd decay, which starts at step {decay_start} (the last "
                f"decay_fraction={c['decay_fraction']} of {total_steps} steps); lower "
                "warmup_steps or decay_fraction.")


def make_lr_schedule(optim_cfg, total_steps: int) -> optax.Schedule:
    """The learning rate per optimizer step, from the `config.optim` section (checked here).

    cosine:   0 -> lr linearly over warmup_steps, then cosine to min_lr_ratio * lr at total_steps.
    wsd:      warmup, lr held until the last round(decay_fraction * total_steps) steps, then a
              linear or 1-sqrt decay to min_lr_ratio * lr at total_steps.
    constant: warmup, then lr.
    """
    c = _section(optim_cfg, "optim")
    _check_optim(c, total_steps)
    lr, warmup = float(c["lr"]), int(c["warmup_steps"])
    lr_min = c["min_lr_ratio"] * lr
    warmup_fn = optax.linear_schedule(0.0, lr, warmup)
    if c["schedule"] == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, lr, warmup, total_steps, end_value=lr_min)
    if c["schedule"] == "constant":
        # Joined by hand: optax.warmup_constant_schedule stays at 0 when warmup_steps == 0.
        return optax.join_schedules([warmup_fn, optax.constant_schedule(lr)], [warmup])
    decay = max(1, round(c["decay_fraction"] * total_steps))
    if c["decay_shape"] == "linear":
        decay_fn = optax.linear_schedule(lr, lr_min, decay)
    else:
        def decay_fn(count):  # 1-sqrt: optax has no builder for this shape
            progress = jnp.clip(count / decay, 0.0, 1.0)
            return lr_min + (lr - lr_min) * (1.0 - jnp.sqrt(progress))
    return optax.join_schedules([warmup_fn, optax.constant_schedule(lr), decay_fn],
                                [warmup, total_steps - decay])
