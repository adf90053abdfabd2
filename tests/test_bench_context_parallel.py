"""tools/bench_context_parallel.py: the case list, the branch a SkyLadder window takes, the tables,
a case past its timeout, and (slow) a dry run on simulated CPU devices end to end."""
import json
import os
import subprocess
import sys

import pytest

TOOLS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools")
sys.path.insert(0, TOOLS)

import bench_context_parallel as bench  # noqa: E402

SCRIPT = os.path.join(TOOLS, "bench_context_parallel.py")


def parse(*argv):
    return bench.build_parser().parse_args(list(argv))


def test_cases_per_device_count():
    """8 GPUs: every group, hybrid from 4 devices (context x ulysses 2), the million tokens on 4
    and 8 with remat full first; 1 GPU: weak scaling's single-device cases only. Keys are unique
    within a group; a case listed in two groups (million's 8-GPU documents ring with
    save_attention = weak scaling's) has one key, so it runs once."""
    args = parse("--out", "unused")
    eight = bench.make_cases(args, 8)
    assert [g for g in bench.GROUPS if any(c.group == g for c in eight)] == list(bench.GROUPS)
    for group in bench.GROUPS:
        keys = [c.key for c in eight if c.group == group]
        assert len(keys) == len(set(keys)), group
    weak = [c for c in eight if c.group == "weak"]
    assert {(c.gpus, c.strategy) for c in weak if c.variant == "causal"} == {
        (1, "single"), *((n, s) for n in (2, 4, 8) for s in ("ring", "all_gather", "ulysses")), (4, "hybrid"),
        (8, "hybrid")}
    assert all(c.seq_len == 131072 * c.gpus for c in weak)
    assert {c.steps for c in weak if c.variant == "causal" and c.seq_len >= 524288} == {1}
    hybrid = next(c for c in weak if c.strategy == "hybrid" and c.gpus == 8)
    assert hybrid.mesh == {"mesh.data": 1, "mesh.fsdp": 1, "mesh.context": 4, "mesh.ulysses": 2}
    million = [c for c in eight if c.group == "million"]
    assert [(c.gpus, c.variant, c.remat) for c in million] == [
        (4, "docs", "full"), (4, "local_global", "full"), (8, "docs", "full"), (8, "docs", "save_attention"),
        (8, "local_global", "full"), (8, "local_global", "save_attention")]
    assert million[3].requires == million[2].key
    assert million[3].key in {c.key for c in weak}
    sky = [c for c in eight if c.group == "skyladder"]
    assert {(c.window, c.window_aware) for c in sky if c.kind == "train"} == {
        (w, a) for w in (64, 1024, 8192) for a in (True, False)}
    assert all(c.seq_len == 1048576 for c in sky)
    overrides = next(c for c in sky if c.kind == "train" and not c.window_aware).overrides(False)
    assert overrides["skyladder.constant_window"] == 64 and overrides["parallel.context_strategy"] == "ring"
    fsdp = next(c for c in eight if c.strategy == "fsdp")
    assert fsdp.mesh["mesh.fsdp"] == 4 and fsdp.rows == 4 and "parallel.context_strategy" not in fsdp.overrides(False)
    assert {c.group for c in bench.make_cases(args, 1)} == {"weak"}
    assert {(c.gpus, c.strategy) for c in bench.make_cases(parse("--out", "x", "--only", "weak"), 2)} == {
        (1, "single"), (2, "ring"), (2, "all_gather"), (2, "ulysses")}
    dry = bench.make_cases(parse("--out", "x", "--dry_run"), 8)
    assert max(c.seq_len for c in dry) == 2048 and dry[0].overrides(True)["model.d_model"] == 64


def test_halo_branch_and_traffic_bytes():
    """A window of w looks back w-1 tokens; the ladder's plan i covers 2^i pieces, the last branch
    is the full ring; a program without a switch (the full ring forced) sends its fixed bytes."""
    piece = 65536  # 1M tokens on a ring of 8
    assert [bench.halo_branch(w, piece, 5) for w in (64, 8192, piece + 1, piece + 2, 4 * piece + 1)] == [0, 0, 0, 1, 2]
    assert bench.halo_branch(8 * piece, piece, 4) == 3  # wider than the ladder: the full ring
    row = dict(fixed=10, branches=[[1, 2, 100], [3, 4, 200]], piece_len=piece)
    assert bench.traffic_bytes(row, 64) == (14, "halo plan 0 (1 piece back)")
    assert bench.traffic_bytes(row, 8 * piece)[0] == 310
    assert bench.traffic_bytes(dict(fixed=500, branches=[], piece_len=piece), 64) == (500, "full ring")


def test_tables_from_results():
    """Scaling efficiency against one GPU, losses against the single-GPU run, what did not fit."""
    args = parse("--out", "unused", "--dry_run")
    cases = bench.make_cases(args, 2)
    one = next(c for c in cases if c.group == "weak" and c.variant == "causal" and c.gpus == 1)
    ring = next(c for c in cases if c.group == "weak" and c.variant == "causal" and c.strategy == "ring")
    ref = next(c for c in cases if c.group == "check" and c.variant == "docs" and c.strategy == "single")
    check = next(c for c in cases if c.group == "check" and c.variant == "docs" and c.strategy == "ulysses")
    row = lambda tps, losses=(1.0,): dict(step_ms=100.0, tokens_per_s_per_device=tps, mfu_ours=0.4,
                                          memory_gib=1.0, losses=list(losses))
    results = {one.key: dict(status="ok", row=row(1000.0)), ring.key: dict(status="ok", row=row(800.0)),
               ref.key: dict(status="ok", row=row(1.0, [5.0] * 10)),
               check.key: dict(status="ok", row=row(1.0, [5.0] * 9 + [5.1]))}
    out = bench.tables(cases, results, args)
    weak = out["1. Weak scaling: tokens per GPU fixed"][1]
    assert [r[-1] for r in weak if r[0] == "causal"][:2] == ["100%", "80%"]
    checks = {r[0]: r for r in out[next(t for t in out if t.startswith("4."))][1]}
    assert checks[check.label][-1] == "FAIL" and checks[check.label][-2] == "1.0e-01"
    text = bench.render(out, markdown=True)
    assert "| model | GPUs |" in text and "not run" in text


def test_case_past_its_timeout_is_ended(tmp_path):
    """A case that outlives its timeout is ended (its whole process group) and recorded as a
    timeout; the sweep goes on and prints its tables."""
    out = tmp_path / "out"
    run = subprocess.run([sys.executable, SCRIPT, "--dry_run", "--gpus", "1", "--only", "weak", "--masks", "causal",
                          "--out", str(out), "--case_timeout", "3", "--overhead_s", "1"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads((out / "cases" / "causal-c1-single-save_attention-L256x1-s1+2.json").read_text())
    assert result["status"] == "timeout" and "3 s" in result["error"]
    assert "1. Weak scaling" in run.stdout and "all done" in run.stdout


@pytest.mark.slow
def test_dry_run_end_to_end(tmp_path):
    """The real code paths on 2 simulated CPU devices at tiny shapes (30 s on 2 idle cores, about
    2 minutes when they are busy: hence slow):
    one device against a ring of 2 (weak scaling), and the compiled ring's traffic for a SkyLadder
    window, window-aware and forced full (the forced program sends the fallback branch's bytes);
    tables printed last, markdown appended to the given path, a second call runs nothing."""
    out, md = tmp_path / "out", tmp_path / "bench.md"
    argv = [sys.executable, SCRIPT, "--dry_run", "--gpus", "2", "--only", "weak,skyladder", "--masks", "causal",
            "--strategies", "ring", "--sky_windows", "8", "--match", "causal-c", "--match", "traffic-sky",
            "--out", str(out), "--markdown", str(md)]
    run = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["results"]) == {"causal-c1-single-save_attention-L256x1-s1+2",
                                       "causal-c2-ring-save_attention-L512x1-s1+2", "traffic-sky-c2-ring-L512",
                                       "traffic-sky-c2-ring-L512-fullring"}
    assert all(r["status"] == "ok" for r in summary["results"].values()), summary["results"]
    aware = summary["results"]["traffic-sky-c2-ring-L512"]["row"]
    full = summary["results"]["traffic-sky-c2-ring-L512-fullring"]["row"]
    assert len(aware["branches"]) == 2 and aware["unknown_trip_counts"] == 0  # fwd and bwd switches
    assert all(b[0] < b[-1] for b in aware["branches"])  # the halo plan sends less than the full ring
    assert full["branches"] == [] and full["fixed"] == sum(b[-1] for b in aware["branches"]) > 0
    tail = run.stdout.rstrip().splitlines()
    assert tail[-1].startswith("causal  2") and "all done" in run.stdout  # the weak-scaling table, last
    assert tail[-4].startswith("1. Weak scaling") and tail[-3].split()[:2] == ["model", "GPUs"]
    assert "tools/bench_context_parallel.py" in md.read_text() and "efficiency vs 1 GPU" in md.read_text()
    again = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert "--- " not in again.stdout and "all done" in again.stdout
