"""The benchmark harness's CPU options: a provider's own dtype (``Provider(dtype=...)``, the bf16
providers of benchmarks/linear_logprob.py) and ``--emulate-avx2`` (MKL, ATen, oneDNN and the
rag_kernels C++ kernels capped at AVX2, rows labelled by their device string)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # benchmarks/ is a top-level folder, not an installed package
    sys.path.insert(0, str(REPO))

from benchmarks import harness  # noqa: E402
from benchmarks.harness import Case, Provider  # noqa: E402
from rag_kernels.ops import registry  # noqa: E402


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in harness.ISA_LIMIT_VARS}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    env.update(extra)
    return env


def test_provider_dtype_overrides_the_case():
    p = Provider("x_bf16", lambda case: lambda: None, dtype="bfloat16")
    case = Case({"N": 4}, "fwd", "cpu", "float32")
    assert p.case_for(case) == Case({"N": 4}, "fwd", "cpu", "bfloat16")
    assert Provider("x", lambda case: None).case_for(case) is case


def test_device_name_lists_isa_caps(monkeypatch):
    for k in harness.ISA_LIMIT_VARS:
        monkeypatch.delenv(k, raising=False)
    plain = harness.device_name("cpu")
    assert "[" not in plain
    monkeypatch.setenv("MKL_ENABLE_INSTRUCTIONS", "AVX2")
    assert harness.device_name("cpu") == plain + " [MKL_ENABLE_INSTRUCTIONS=AVX2]"


@pytest.mark.skipif(
    registry.unavailable_reason("linear_logprob", "cpu") is not None,
    reason="the C++ extension is not built",
)
@pytest.mark.parametrize("emulate", [False, True], ids=["native", "emulate-avx2"])
def test_linear_logprob_bf16_providers_and_emulation(tmp_path, emulate):
    out = tmp_path / "ll.csv"
    cmd = [sys.executable, "-m", "benchmarks.linear_logprob", "--quick", "--repeats", "1",
           "--modes", "fwd+bwd", "--providers", "naive,rk_fused,naive_bf16,rk_fused_bf16",
           "--csv", str(out)] + (["--emulate-avx2"] if emulate else [])  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = {r["provider"]: r for r in harness.read_rows(out)}
    assert set(rows) == {"naive", "rk_fused", "naive_bf16", "rk_fused_bf16"}
    assert rows["rk_fused"]["dtype"] == "float32" and rows["rk_fused_bf16"]["dtype"] == "bfloat16"
    assert rows["naive_bf16"]["dtype"] == "bfloat16"
    for r in rows.values():
        caps = "RAG_KERNELS_CPU_ISA=avx2" in r["device"]
        assert caps == emulate, r["device"]
        if emulate:
            assert r["cpu_isa"] in ("avx2", "default") and r["bf16_gemm"] == "converted"
        else:
            assert r["cpu_isa"] in ("avx512", "avx2", "default")
            assert r["bf16_gemm"] in ("native", "converted")


def test_emulate_avx2_rejects_cuda():
    cmd = [sys.executable, "-m", "benchmarks.linear_logprob", "--device", "cuda", "--emulate-avx2"]
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "--emulate-avx2 applies to --device cpu only" in proc.stderr
