"""The benchmark harness: statistics, CSV format, fresh-process peak memory, ratio tables, and
``--quick`` smoke runs of the benchmark scripts (tiny shapes, a temporary CSV)."""

import csv
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # benchmarks/ is a top-level folder, not an installed package
    sys.path.insert(0, str(REPO))

from benchmarks import harness  # noqa: E402
from benchmarks.harness import COLUMNS, Benchmark, Case, Provider, Unavailable  # noqa: E402


def _env(extra_path: Path | None = None) -> dict:
    env = dict(os.environ)
    paths = [str(extra_path)] if extra_path else []
    env["PYTHONPATH"] = os.pathsep.join([*paths, str(REPO), env.get("PYTHONPATH", "")])
    return env


def _header(path) -> list[str]:
    with open(path, newline="") as f:
        return next(csv.reader(f))


# ----------------------------------------------------------------------------- statistics


@pytest.mark.parametrize(
    "values, expected",
    [
        ([5.0], (5.0, 5.0, 5.0)),
        ([3.0, 1.0], (2.0, 1.4, 2.6)),
        # 1..10 unsorted: median 5.5, p20 = 1 + 0.2*9 = 2.8, p80 = 1 + 0.8*9 = 8.2
        ([7.0, 2.0, 9.0, 1.0, 10.0, 4.0, 3.0, 8.0, 6.0, 5.0], (5.5, 2.8, 8.2)),
        ([1.0, 1.0, 1.0, 100.0, 1.0, 1.0], (1.0, 1.0, 1.0)),  # one outlier leaves p80 alone
    ],
    ids=["single", "two", "one-to-ten", "outlier"],
)
def test_summarize_percentiles(values, expected):
    got = harness.summarize(values)
    assert got == pytest.approx(expected, abs=1e-12)
    np = pytest.importorskip("numpy")
    assert got == pytest.approx(
        (np.percentile(values, 50), np.percentile(values, 20), np.percentile(values, 80))
    )


def test_git_commit_format():
    assert re.fullmatch(r"[0-9a-f]{4,40}(-dirty)?|unknown", harness.git_commit())


# ----------------------------------------------------------------------------- CSV / runner


def _fake_bench(calls: list) -> Benchmark:
    def setup_sleep(case: Case):
        import torch

        x = torch.ones(case.shape["n"])
        calls.append(("setup", case.mode))
        return lambda: x * 2 if case.mode == "fwd" else (x * 2).sum()

    def setup_unavail(case: Case):
        raise Unavailable("no such library here")

    def setup_broken(case: Case):
        def fn():
            raise RuntimeError("kernel exploded")

        return fn

    return Benchmark(
        op="fake",
        module="unused",
        providers=[
            Provider("base", setup_sleep),
            Provider("other", setup_sleep),
            Provider("gated", setup_sleep, available=lambda c: "gated off for the test"),
            Provider("raises", setup_unavail),
            Provider("broken", setup_broken),
        ],
        cases=lambda args: [
            Case({"n": n}, mode, args.device, "float32")
            for n in (17, 33)
            for mode in ("fwd", "bwd")
        ],
        flops=lambda case: 1e6,
        baseline="base",
    )


def test_run_writes_long_format_rows(tmp_path, capsys):
    calls = []
    out = tmp_path / "fake.csv"
    bench = _fake_bench(calls)
    # exit 1: a point failed (provider "broken"), after every other point was measured
    assert bench.main(["--inprocess", "--csv", str(out), "--repeats", "3", "--warmup", "2"]) == 1
    header = _header(out)
    assert header[: len(COLUMNS)] == list(COLUMNS)
    assert {"tflops", "dtype", "repeats"} <= set(header[len(COLUMNS) :])
    rows = harness.read_rows(out)
    assert len(rows) == 2 * 2 * 2  # 2 working providers x 2 shapes x 2 modes
    assert {r["provider"] for r in rows} == {"base", "other"}
    assert {r["shape"] for r in rows} == {"n=17", "n=33"}
    for r in rows:
        assert r["op"] == "fake" and r["repeats"] == "3"
        assert float(r["p20_ms"]) <= float(r["median_ms"]) <= float(r["p80_ms"])
        assert float(r["peak_mb"]) >= 0 and float(r["tflops"]) > 0
        assert r["device"] and r["commit"] and re.fullmatch(r"\d{4}-\d\d-\d\dT.*Z", r["date"])
    text = capsys.readouterr().out
    assert "gated off for the test" in text and "no such library here" in text
    assert "FAIL broken" in text and "kernel exploded" in text  # reported, run goes on
    assert "other / base" in text  # ratio table printed at the end
    # A second run appends; --providers / --modes filter.
    bench.main(["--inprocess", "--csv", str(out), "--providers", "other", "--modes", "bwd"])
    assert len(harness.read_rows(out)) == 8 + 2


def test_write_rows_widens_header(tmp_path):
    out = tmp_path / "x.csv"
    base = dict.fromkeys(COLUMNS, "1")
    harness.write_rows(out, [base])
    harness.write_rows(out, [{**base, "provider": "p2", "tflops": "3.5"}])
    harness.write_rows(out, [{**base, "provider": "p3"}])
    assert _header(out) == [*COLUMNS, "tflops"]
    rows = harness.read_rows(out)
    assert [r["tflops"] for r in rows] == ["", "3.5", ""]
    assert [r["provider"] for r in rows] == ["1", "p2", "p3"]


# ----------------------------------------------------------------------------- memory

_MEMBENCH = textwrap.dedent(
    """
    import os, sys
    from benchmarks import harness
    from benchmarks.harness import Benchmark, Case, Provider

    if os.environ.get("MEMBENCH_NO_CLEAR_REFS"):  # exercise the ru_maxrss fallback
        harness._reset_hwm = lambda: False

    def setup_alloc(case):
        import torch
        inputs = torch.ones(30 * 2**20 // 4)  # 30 MB of inputs: part of the baseline
        if case.shape["scratch"]:  # setup's own transient peak must not hide the op's
            scratch = torch.ones(100 * 2**20 // 4); del scratch
        n = case.shape["mb"] * 2**20 // 4
        return lambda: (inputs.sum(), torch.ones(n))  # the op allocates and touches n floats

    BENCH = Benchmark(
        op="mem", module="membench",
        providers=[Provider("alloc", setup_alloc)],
        cases=lambda args: [Case({"mb": mb, "scratch": sc}, "fwd")
                            for mb, sc in ((50, 1), (0, 1), (50, 0))],
    )
    if __name__ == "__main__":
        sys.exit(BENCH.main())
    """
)


def _membench(tmp_path, *args, env=None) -> dict:
    (tmp_path / "membench.py").write_text(_MEMBENCH)
    out = tmp_path / "mem.csv"
    cmd = [sys.executable, "-m", "membench", "--csv", str(out), "--repeats", "1", "--warmup", "2"]
    proc = subprocess.run(
        [*cmd, *args], cwd=tmp_path, env={**_env(tmp_path), **(env or {})},
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return {r["shape"]: r for r in harness.read_rows(out)}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RSS via /proc on Linux")
def test_fresh_process_memory_detects_50mb(tmp_path):
    rows = _membench(tmp_path, "--shapes", "mb=50 scratch=1,mb=0 scratch=1")
    assert set(rows) == {"mb=50 scratch=1", "mb=0 scratch=1"}
    big, none = rows["mb=50 scratch=1"], rows["mb=0 scratch=1"]
    assert big["mem_method"] == "vmhwm"
    assert 45.0 <= float(big["peak_mb"]) <= 60.0, big
    assert float(none["peak_mb"]) <= 5.0, none


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ru_maxrss in KiB on Linux")
def test_fresh_process_memory_maxrss_fallback(tmp_path):
    rows = _membench(tmp_path, "--shapes", "mb=50 scratch=0", env={"MEMBENCH_NO_CLEAR_REFS": "1"})
    (row,) = rows.values()
    assert row["mem_method"] == "ru_maxrss"
    assert 45.0 <= float(row["peak_mb"]) <= 60.0, row


# ----------------------------------------------------------------------------- ratios


def _row(provider, shape, mode, ms, mb, device="cpu X"):
    return {"op": "o", "provider": provider, "shape": shape, "mode": mode,
            "median_ms": str(ms), "peak_mb": str(mb), "device": device}  # fmt: skip


def test_ratio_table():
    rows = [
        _row("naive", "N=8", "fwd", 999.0, 1.0),  # superseded by the rerun below
        _row("naive", "N=8", "fwd", 100.0, 400.0),
        _row("ours", "N=8", "fwd", 50.0, 100.0),
        _row("naive", "N=8", "fwd+bwd", 200.0, 0.0),
        _row("ours", "N=8", "fwd+bwd", 300.0, 10.0),
        _row("other", "N=8", "fwd", 25.0, 800.0),
        _row("ours", "N=8", "fwd", 1.0, 1.0, device="gpu Y"),  # other device: excluded
    ]
    t = harness.ratio_table(rows, "naive", device="cpu")
    lines = t.splitlines()
    assert lines[0] == "| shape | mode | naive (ms) | ours / naive | other / naive |"
    assert lines[2] == "| N=8 | fwd | 100.0 | 0.50× | 0.25× |"
    assert lines[3] == "| N=8 | fwd+bwd | 200.0 | 1.50× | — |"
    m = harness.ratio_table(rows, "naive", metric="peak_mb", device="cpu").splitlines()
    assert m[0].startswith("| shape | mode | naive (MB) |")
    assert m[2] == "| N=8 | fwd | 400.0 | 0.25× | 2.00× |"
    assert m[3] == "| N=8 | fwd+bwd | 0.0 | — | — |"  # zero baseline: no ratio


def test_ratios_cli(tmp_path, capsys):
    out = tmp_path / "r.csv"
    harness.write_rows(out, [_row("a", "s", "fwd", 10.0, 4.0), _row("b", "s", "fwd", 5.0, 1.0)])
    assert harness._cli(["ratios", str(out), "--baseline", "a"]) == 0
    text = capsys.readouterr().out
    assert "| s | fwd | 10.0 | 0.50× |" in text and "| s | fwd | 4.0 | 0.25× |" in text


# ----------------------------------------------------------------------------- smoke runs


def _smoke(module: str, csv_path: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", module, "--quick", "--inprocess", "--repeats", "1",
           "--warmup", "1", "--csv", str(csv_path), *extra]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def test_linear_logprob_quick(tmp_path):
    out = tmp_path / "ll.csv"
    # cce is left out: its CPU path compiles with torch.compile (tens of seconds).
    proc = _smoke("benchmarks.linear_logprob", out, "--providers",
                  "naive,torch_lce,liger,rk_fused,rk_reference")  # fmt: skip
    rows = harness.read_rows(out)
    got = {(r["provider"], r["mode"]) for r in rows}
    assert {("naive", "fwd"), ("naive", "fwd+bwd"), ("rk_reference", "fwd+bwd")} <= got
    assert "skip liger" in proc.stdout  # CUDA only: skipped with a reason, no row
    assert all(r["shape"] == "N=67 H=33 V=517" and r["op"] == "linear_logprob" for r in rows)
    # the plot reads the same CSV (matplotlib: the bench extra, which make test installs)
    pytest.importorskip("matplotlib")
    from benchmarks.plot import plot_csv

    (png,) = plot_csv(out)
    assert png.exists() and png.stat().st_size > 1000


def test_rag_loss_quick(tmp_path):
    out = tmp_path / "rag.csv"
    proc = _smoke("benchmarks.rag_loss", out)
    rows = harness.read_rows(out)
    got = {(r["provider"], r["mode"]) for r in rows}
    modes = {"sequence_eps0", "sequence_eps0.1", "token_eps0", "token_eps0.1"}
    assert {("hf_get_nll", m) for m in modes} <= got, proc.stdout
    assert "skip cce_marginalize" in proc.stdout
    assert "rk_reference / hf_get_nll" in proc.stdout or "rk_reference" not in {
        r["provider"] for r in rows
    }


def test_rag_loss_fused_provider_refuses_without_fused_kernels(monkeypatch):
    """``rk_fused`` runs ``impl="auto"``, which falls back to the reference where the C++ build
    did not load: the provider must then be unavailable, never the reference under its name."""
    import rag_kernels as rk
    from benchmarks import rag_loss

    case = Case({"B": 2, "K": 3, "T": 9, "H": 17, "V": 101}, "token_eps0.1", "cpu", "float32")
    real = rk.available_impls
    if "cpu" in real("linear_logprob"):
        assert rag_loss._rk_fused_available(case) is None
    monkeypatch.setattr(rk, "available_impls", lambda op: tuple(i for i in real(op) if i != "cpu"))
    reason = rag_loss._rk_fused_available(case)
    assert reason and "impl='cpu'" in reason


def test_a_user_file_as_csv_is_never_rewritten(tmp_path, capsys):
    """--csv naming a file that is not a results CSV (or a symlink, a directory) rewrote it
    as a widened results CSV; it is now refused before anything is measured."""
    calls = []
    bench = _fake_bench(calls)
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes\nsecond line\n")
    other = tmp_path / "other.csv"
    other.write_text("a,b\n1,2\n")
    target = tmp_path / "target.csv"
    harness.write_rows(target, [dict.fromkeys(COLUMNS, "1")])
    link = tmp_path / "link.csv"
    link.symlink_to(target)
    before = {p: p.read_bytes() for p in (notes, other, target)}
    for path, what in [
        (notes, "exists and is not a results CSV"),
        (other, "exists and is not a results CSV"),
        (link, "is a symlink"),
        (tmp_path, "is a directory"),
        (notes / "x.csv", "cannot be created"),
    ]:
        assert bench.main(["--inprocess", "--csv", str(path)]) == 2, path
        err = capsys.readouterr().err
        assert f"--csv {path}: {what}" in err, err
    assert {p: p.read_bytes() for p in before} == before and not calls
    with pytest.raises(ValueError, match="is not a results CSV"):
        harness.write_rows(notes, [dict.fromkeys(COLUMNS, "1")])


@pytest.mark.parametrize(
    "argv, flag",
    [
        (["--repeats", "0"], "--repeats"),
        (["--warmup", "-1"], "--warmup"),
        (["--timeout", "0"], "--timeout"),
        (["--timeout", "nan"], "--timeout"),
        (["--modes", "nosuch"], "--modes"),
        (["--shapes", "N=1"], "--shapes"),
        (["--providers", "nosuch"], "--providers"),
    ],
    ids=lambda v: " ".join(v) if isinstance(v, list) else v,
)
def test_bad_benchmark_arguments_name_the_flag(tmp_path, capsys, argv, flag):
    """They were taken silently (--repeats 0 measured once, an unknown mode ran 0 cases and
    exited 0, --timeout 0 failed every point with exit 0)."""
    bench = _fake_bench([])
    with pytest.raises(SystemExit) as exc:
        code = bench.main(["--inprocess", "--csv", str(tmp_path / "r.csv"), *argv])
        raise SystemExit(code)
    assert exc.value.code == 2
    assert flag in capsys.readouterr().err
    assert not (tmp_path / "r.csv").exists()


def test_plot_and_ratios_refuse_bad_arguments(tmp_path, capsys):
    """plot printed a path it did not write (--out without .png) and raised tracebacks on a
    missing CSV; ratios exited 0 with empty tables on an unknown baseline or metric."""
    from benchmarks import plot

    out = tmp_path / "r.csv"
    harness.write_rows(out, [dict.fromkeys(COLUMNS, "1") | {"provider": "base"}])
    cases = [
        (plot.main, [str(tmp_path / "missing.csv")], "no such results CSV"),
        (plot.main, [str(out), "--out", str(tmp_path / "noext")], "must be a .png file path"),
        (harness._cli, ["ratios", str(tmp_path / "missing.csv"), "--baseline", "base"],
         "no such results CSV"),
        (harness._cli, ["ratios", str(out), "--baseline", "nosuch"], "--baseline nosuch"),
        (harness._cli, ["ratios", str(out), "--baseline", "base", "--metric", "speed"],
         "--metric: unknown ['speed']"),
    ]  # fmt: skip
    for fn, argv, text in cases:
        with pytest.raises(SystemExit) as exc:
            fn(argv)
        assert exc.value.code == 2, argv
        assert text in capsys.readouterr().err, argv
    assert not (tmp_path / "noext").exists() and not (tmp_path / "noext.png").exists()
