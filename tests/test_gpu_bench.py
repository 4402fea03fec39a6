"""bench/gpu.py runs end to end at its CPU smoke size, so it cannot rot between GPU sessions.

One run (tiny models, a few seconds of work) feeds every test: the table is printed, every
correctness row passes, the speed configurations were measured, and --json / --write /
--from-json round-trip into a BENCHMARKS.md section without touching the rest of the file.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("diffusers")

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu.py"
START, END = "<!-- bench/gpu.py: start -->", "<!-- bench/gpu.py: end -->"
HEADER = "| section | check | result | target | status |"


def _run(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=300
    )


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gpu_bench")
    bench = tmp / "BENCHMARKS.md"
    bench.write_text("# Benchmarks\n\n## Someone else's section\n\nkept as it is\n")
    proc = _run("--smoke", "--json", str(tmp / "run.json"), "--write",
                "--benchmarks-file", str(bench))  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc, json.loads((tmp / "run.json").read_text()), bench


def test_prints_one_table_with_every_section(smoke):
    proc, _, _ = smoke
    assert proc.stdout.count(HEADER) == 1
    table = proc.stdout.split(HEADER, 1)[1]
    for section in ("correctness", "FLOP bound", "speed", "targets"):
        assert f"\n| {section} |" in table, section


def test_correctness_rows_all_pass(smoke):
    _, data, _ = smoke
    rows = [r for r in data["rows"] if r["section"] == "correctness"]
    assert all(r["status"] in ("ok", "skip") for r in rows), [
        r for r in rows if r["status"] != "ok"
    ]
    passed = {r["check"] for r in rows if r["status"] == "ok"}
    # what must run on any device; only xformers (CUDA-only) may be skipped
    for needle in ("U-Net cpu float32", "U-Net cpu float16", "U-Net cpu bfloat16",
                   "attention sdpa vs math", "attention sliced vs math", "fused QKV",
                   "VAE decode cpu float16", "pipeline", "NaN guard", "ours vs diffusers image",
                   "U-Net compiled"):  # fmt: skip
        assert any(needle in check for check in passed), needle
    skipped = [r["check"] for r in rows if r["status"] == "skip"]
    assert all("xformers" in check for check in skipped), skipped
    assert not any(r["status"] in ("FAIL", "error") for r in data["rows"])


def test_speed_and_flop_bound_measured(smoke):
    _, data, _ = smoke
    speed = data["speed"]
    assert {"ours, eager", "diffusers, eager", "ours, compiled (default)",
            "diffusers, compiled (default)"} <= set(speed)  # fmt: skip
    for result in speed.values():
        assert result["it_s"] > 0 and result["s_image"] > 0
        assert 0 < result["bound_fraction"] < 1  # slower than the matmul-rate bound
    flops = data["flops"]
    steps = data["meta"]["config"]["steps"]
    assert flops["per_image"] == flops["unet_call_batch1"] * 2 * steps + flops["decode"]
    assert flops["unet_call_batch1"] > 0 and data["matmul_flops_per_s"] > 0


def test_write_replaces_only_its_section(smoke, tmp_path):
    _, data, bench = smoke
    text = bench.read_text()
    assert text.startswith("# Benchmarks\n\n## Someone else's section\n\nkept as it is\n")
    assert text.count(START) == text.count(END) == 1 and HEADER in text
    # rendering the saved run again replaces the section instead of adding one
    saved = tmp_path / "run.json"
    saved.write_text(json.dumps(data))
    again = _run("--from-json", str(saved), "--write", "--benchmarks-file", str(bench))
    assert again.returncode == 0, again.stderr[-2000:]
    assert bench.read_text() == text


def test_failed_row_gives_exit_status_1(smoke, tmp_path):
    _, data, _ = smoke
    data = dict(data, rows=data["rows"] + [dict(section="correctness", check="x", result="y",
                                                target="z", status="FAIL")])  # fmt: skip
    saved = tmp_path / "failed.json"
    saved.write_text(json.dumps(data))
    proc = _run("--from-json", str(saved))
    assert proc.returncode == 1 and "| correctness | x | y | z | FAIL |" in proc.stdout


def test_quick_measures_only_each_librarys_fastest_compiled_setting(tmp_path):
    proc = _run("--smoke", "--quick", "--json", str(tmp_path / "quick.json"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads((tmp_path / "quick.json").read_text())
    assert data["meta"]["quick"] is True
    # on the CPU there is no CUDA graph: ours compiled, diffusers reduce-overhead (traced)
    assert set(data["speed"]) == {
        "ours, compiled (default)",
        "diffusers, compiled (reduce-overhead)",
    }
    checks = [r["check"] for r in data["rows"] if r["section"] == "correctness"]
    assert checks == ["U-Net compiled (default) vs eager, cpu float32"]
    assert "`--quick`" in proc.stdout


def test_quick_cpp_wrapper_compiles_both_libraries_with_and_without_it(tmp_path):
    proc = _run("--smoke", "--quick", "--cpp-wrapper", "--json", str(tmp_path / "cpp.json"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads((tmp_path / "cpp.json").read_text())
    assert set(data["speed"]) == {
        f"{name}, compiled (default{cpp})"
        for name in ("ours", "diffusers")
        for cpp in ("", ", C++ wrapper")
    }
    checks = [r["check"] for r in data["rows"] if r["section"] == "correctness"]
    assert checks == [
        "U-Net compiled (default) vs eager, cpu float32",
        "U-Net compiled (default, C++ wrapper) vs eager, cpu float32",
    ]
    targets = [r["check"] for r in data["rows"] if r["section"] == "targets"]
    assert "ours / diffusers it/s, compiled (default, C++ wrapper)" in targets


def test_from_json_renders_several_runs_under_one_title(smoke, tmp_path):
    _, data, _ = smoke
    paths = []
    for i, quick in enumerate((False, True)):
        paths.append(tmp_path / f"run{i}.json")
        run = dict(data, meta=dict(data["meta"], quick=quick, date=f"2026-01-0{i + 1} 00:00"))
        paths[-1].write_text(json.dumps(run))
    proc = _run("--from-json", *map(str, paths))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("## GPU: correctness") == 1 and proc.stdout.count(HEADER) == 2
    first, second = proc.stdout.index("2026-01-01"), proc.stdout.index("2026-01-02")
    assert first < second and proc.stdout.count("`--quick`") == 1


@pytest.fixture
def gpu(monkeypatch):
    """bench/gpu.py as a module (it imports its neighbours in bench/)."""
    import importlib.util

    monkeypatch.syspath_prepend(str(SCRIPT.parent))
    spec = importlib.util.spec_from_file_location("gpu_bench_module", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_target_rows_judge_the_100_its_target_only_with_cuda_graphs(gpu):
    speed = {
        "ours, compiled (default)": {"it_s": 60.0},
        "diffusers, compiled (default)": {"it_s": 40.0},
        "ours, compiled (default, C++ wrapper)": {"it_s": 73.0},
        "diffusers, compiled (default, C++ wrapper)": {"it_s": 74.5},
    }
    rows = {r.check: r for r in gpu.target_rows(speed, "sd15", "cuda", "default")}
    assert rows["ours / diffusers it/s, compiled (default)"].status == "ok"  # 1.5x
    assert rows["ours / diffusers it/s, compiled (default, C++ wrapper)"].status == "miss"
    best = rows["best: ours, compiled (default, C++ wrapper)"]
    assert best.status == "info" and "not in this run" in best.target  # no CUDA-graph setting run
    speed["ours, compiled (default) + CUDA graph"] = {"it_s": 95.0}
    rows = {r.check: r for r in gpu.target_rows(speed, "sd15", "cuda", "default")}
    assert rows["best: ours, compiled (default) + CUDA graph"].status == "miss"  # < 100 it/s
    rows = gpu.target_rows(speed, "tiny", "cpu", "default")  # smoke size: never judged
    assert rows and {r.status for r in rows} == {"info"}


def test_from_json_judges_saved_targets_again(smoke, gpu):
    _, data, _ = smoke
    stale = dict(section="targets", check="an old rule", result="1", target="2", status="miss")
    rows = gpu.rejudged(dict(data, rows=data["rows"] + [stale]))
    assert "an old rule" not in [r.check for r in rows]
    assert [r for r in rows if r.section != "targets"] == [
        gpu.Row(**r) for r in data["rows"] if r["section"] != "targets"
    ]
