"""tools/experiment_skyladder.py: its helpers, and one --smoke run end to end (both arms, curves,
final evaluation with standard errors, loss by position, copy task, figure, table, report)."""
import importlib.util
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(REPO, "tools", "experiment_skyladder.py")


def load_tool():
    spec = importlib.util.spec_from_file_location("experiment_skyladder", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_copy_task_rows_hold_the_key_twice_at_the_asked_depths():
    tool = load_tool()
    from ctxjax.data.tokenizer import ByteTokenizer
    tok = ByteTokenizer()
    hay = "\n".join(f"x_{i} = {i} * 2  # line {i}" for i in range(2000))
    rows, starts, depths, distances, keys = tool.copy_task_rows(tok, hay, 512, 3, seed=0)
    assert rows.shape == (3 * len(tool.DEPTHS), 512) and rows[:, 0].tolist() == [tok.bos_id] * rows.shape[0]
    for row, start, key, distance in zip(rows, starts, keys, distances):
        text = tok.decode(row)
        assert len(key) == tool.KEY_LENGTH and set(key) <= set(tool.KEY_ALPHABET)
        assert tok.decode(row[start:]) == key and text.endswith(tool.CUE + key)
        assert text.count(tool.CUE + key + '"\n') == 1  # the needle, on a line of its own
        needle_key = 1 + text.index(tool.CUE + key) + len(tool.CUE)  # + 1: BOS, which decode drops
        assert start - needle_key == distance  # tokens from the needle's key to the answer's
    assert min(distances[:3]) > 400 > 100 > max(distances[-3:])  # depth 0.02 first, 0.98 last
    assert len(set(keys)) == len(keys)


def test_ratio_se_reach_time_and_budget():
    tool = load_tool()
    mean, se = tool.ratio_and_se([10.0, 20.0], [10, 10])
    assert mean == 1.5 and math.isclose(se, math.sqrt(2 * (25 + 25)) / 20)
    curve = [dict(tokens=t, seconds=s, eval_loss=l) for t, s, l in ((10, 1.0, 3.0), (20, 2.0, 2.0), (30, 3.0, 1.0))]
    assert tool.reach_time(curve, 2.5) == (1.5, 15.0)
    assert tool.reach_time(curve, 3.5) == (1.0, 10)  # already below at the first point
    assert tool.reach_time(curve, 0.5) is None

    from ctxjax.config import load_config
    config = load_config(os.path.join(REPO, tool.LADDER_CONFIG))
    budgeted = tool.with_budget(config, 700, 15)
    assert budgeted.train.steps == 700 and budgeted.eval.every % budgeted.train.log_every == 0
    assert 12 <= 700 // budgeted.eval.every <= 18
    assert budgeted.optim.warmup_steps == round(700 * 36 / 600)
    assert config.train.steps == 600  # a copy: the arm's own config is unchanged


def test_arm_configs_differ_in_the_skyladder_section_alone():
    tool = load_tool()

    class Args:
        smoke, seed = False, 0
    arms, difference = tool.load_arms(Args)
    assert difference and all(key.startswith("skyladder.") for key in difference)
    from ctxjax.model import ModelConfig
    params = ModelConfig.from_config(arms["baseline"].model).param_count()
    assert 50e6 <= params <= 150e6


@pytest.mark.slow  # 49-80 s on 2 shared CPU cores (three compiles of the train step)
def test_smoke_run_writes_every_output(tmp_path):
    out, docs = tmp_path / "out", tmp_path / "docs"
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
    # one device, as on the GPU machine (the suite's conftest simulates 8)
    env["XLA_FLAGS"] = env.get("XLA_FLAGS", "").replace("--xla_force_host_platform_device_count=8", "").strip()
    proc = subprocess.run([sys.executable, TOOL, "--smoke", "--out", str(out), "--report_to", str(docs)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    for name in ("results.json", "skyladder_8k.png", "skyladder_8k.md", "baseline_metrics.jsonl",
                 "skyladder_metrics.jsonl"):
        assert (out / name).stat().st_size > 0, name
    assert (out / "skyladder_8k.png").stat().st_size > 10_000

    r = json.loads((out / "results.json").read_text())
    finite = lambda x: isinstance(x, (int, float)) and math.isfinite(x)
    assert r["smoke"] and r["data"]["arms_read_the_same_batches"] and len(r["data"]["fingerprint"]["sha256"]) == 64
    assert r["environment"]["jax"] and r["environment"]["device_kind"]
    assert all(k.startswith("skyladder.") for k in r["config_difference"])
    base, sky = r["arms"]["baseline"], r["arms"]["skyladder"]
    assert base["steps"] == sky["steps"] and base["tokens"] == sky["tokens"] > 0
    for arm in (base, sky):
        curve = arm["curve"]
        assert len(curve) >= 3 and all(finite(p["eval_loss"]) for p in curve)
        assert [p["tokens"] for p in curve] == sorted({p["tokens"] for p in curve})
        assert all(0 < a["seconds"] < b["seconds"] for a, b in zip(curve, curve[1:]))
        assert curve[-1]["tokens"] == arm["tokens"] and finite(arm["train_seconds"]) and arm["train_seconds"] > 0
        final = arm["final"]
        assert finite(final["loss"]) and 0 < final["se"] < 0.5 and final["target_tokens"] >= 4096
        check = final["curve_subset_check"]  # the script's forward agrees with the trainer's evaluation
        assert math.isclose(check["recomputed"], check["trainer"], rel_tol=1e-3)
        assert len(final["by_position"]) == r["seq_len"] // r["args"]["ppl_bucket"]
        assert all(finite(b["loss"]) and b["tokens"] > 0 for b in final["by_position"])
        assert len(final["copy_task"]) == 5
        assert all(0 <= c["exact_match"] <= 1 and 0 <= c["byte_accuracy"] <= 1 and finite(c["mean_logprob"])
                   for c in final["copy_task"])
    windows = [p["window"] for p in sky["train_curve"]]
    assert windows[0] == 32 and windows[-1] == r["seq_len"] and windows == sorted(windows)
    assert {p["window"] for p in base["train_curve"]} == {r["seq_len"]}
    cmp = r["comparison"]
    assert finite(cmp["final_loss_difference"]["skyladder_minus_baseline"])
    assert finite(cmp["final_loss_difference"]["se_paired_by_row"])
    assert finite(cmp["same_tokens_time_saving_percent"])

    md = (out / "skyladder_8k.md").read_text()
    for text in ("SMOKE TEST", "final validation loss", "paired by row", "tokens/s", "reaches the baseline",
                 "| positions |", "Copy task", "1/36", "Rerun:"):
        assert text in md, text
    readme = (docs / "README.md").read_text()
    assert "## Results" in readme and "skyladder_8k.md" in readme
    assert (docs / "skyladder_8k.png").exists() and (docs / "skyladder_8k.md").exists()
    assert np.isfinite(r["timings"]["total_seconds"])
