"""Test-wide settings. TRITON_INTERPRET must be set before triton is first imported so the
Triton kernels run on CPU tensors in the normal suite; nothing may reach a model hub.

The end of this file holds the device-check support of ``benchmarks/device_check.sh``: a
progress log and a per-test time limit, both off unless their variables are set."""

import contextlib
import faulthandler
import os
import signal
import sys
import threading
import time

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

import triton_interpreter_compat  # noqa: E402

triton_interpreter_compat.install()  # Triton < 3.9 interpreter with NumPy >= 2.4


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny tensors or models (``pytestmark =
    pytest.mark.usefixtures("one_thread")``): more threads only spin against the other jobs
    on a busy 2-core box."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def no_models(monkeypatch, tmp_path):
    """Fail the test if a model is loaded (validation must come first); run in tmp_path."""
    from rag_kernels.cotrain.training import loop as loop_module

    monkeypatch.chdir(tmp_path)

    def boom(*a, **k):
        raise AssertionError("a model was loaded before the error was reported")

    monkeypatch.setattr(loop_module, "load_generator", boom)
    monkeypatch.setattr(loop_module, "load_retriever", boom)


# ----------------------------------------------------------------------------- device check
# benchmarks/device_check.sh runs the GPU tests with these variables set; unset (the normal
# suite), nothing below does anything.
#
# * RK_TEST_LOG=PATH: one line per test start and outcome, appended and fsync-ed as each test
#   ends, so the results survive a killed run (the junit XML is written only at the end):
#   ``START <nodeid>``, ``PASSED|FAILED|SKIPPED|ERROR <nodeid> <seconds>s[: message]``, and
#   ``SESSION exitstatus=<n>`` when the session ends normally. Under pytest-xdist only the
#   controller writes (it sees every worker's reports).
# * RK_TEST_TIMEOUT=SECONDS: per-test limit over setup + call + teardown (pytest-timeout may
#   be absent). Soft: SIGALRM raises TestTimeout inside the test, which fails and the run goes
#   on. Hard, RK_TEST_TIMEOUT_GRACE seconds later (default max(10, limit / 4)): for a test
#   stuck inside C / CUDA, where no Python signal handler runs, faulthandler prints every
#   thread's stack and ends the process; the device check then reruns the tests that had not
#   started (pytest-xdist itself replaces a worker that died).


class TestTimeout(BaseException):
    """A test ran past RK_TEST_TIMEOUT (a BaseException, so ``except Exception`` in the code
    under test cannot swallow it; pytest still reports it as the test's failure)."""

    __test__ = False  # not a test class


_IS_XDIST_WORKER = False
_TEST_END = pytest.StashKey[float]()


@pytest.fixture(params=["native", "fp32-micro", "avx2", "aten"])
def bf16_path(request):
    """The GEMM paths of bf16 inputs (csrc/micro_gemm.h): ``native`` bf16 oneDNN micro-kernel
    GEMMs with fp32 outputs (skipped where the CPU has no bf16 matmul); ``fp32-micro``, fp32
    oneDNN micro-kernel GEMMs on operands converted while packing (an AVX-512 CPU without bf16
    matmul; forced with set_cpu_gemm("fp32") as RAG_KERNELS_CPU_GEMM=fp32 does); ``avx2``, the
    AVX2 fp32 kernel on operands converted while packing (an AVX2-only CPU; forced with
    set_cpu_isa("avx2") as RAG_KERNELS_CPU_ISA=avx2 does); ``aten``, tiles converted to fp32
    for ATen's GEMMs (set_cpu_gemm("aten")). Shared by the C++ kernels' bf16 tests; restores
    both settings."""
    from rag_kernels.ops import _C

    isa, gemm = _C.cpu_isa(), _C.cpu_gemm()
    try:
        if request.param == "native" and not _C.native_bf16_gemm():
            pytest.skip(
                f"no native bf16 GEMM here: cpu_isa={isa}, "
                f"bf16 matmul instructions={_C.cpu_has_bf16_matmul()}"
            )
        if request.param == "fp32-micro":
            _C.set_cpu_gemm("fp32")
            if _C.fp32_gemm() != "onednn":
                pytest.skip(f"no oneDNN micro-kernel GEMMs here (needs AVX-512): cpu_isa={isa}")
        if request.param == "avx2":
            _C.set_cpu_isa("avx2")
            if _C.fp32_gemm() != "avx2":
                pytest.skip(f"no AVX2 here: detected_isa={_C.detected_isa()}")
        if request.param == "aten":
            _C.set_cpu_gemm("aten")
            assert _C.fp32_gemm() == "aten"
        assert _C.native_bf16_gemm() == (request.param == "native")
        yield request.param
    finally:
        _C.set_cpu_isa(isa)
        _C.set_cpu_gemm(gemm)


def pytest_configure(config):
    global _IS_XDIST_WORKER
    _IS_XDIST_WORKER = hasattr(config, "workerinput")
    # pytest-xdist's --dist loadgroup runs the tests of one group on one worker (the GPU tests
    # that take tens of GB); without xdist the mark does nothing.
    config.addinivalue_line("markers", "xdist_group(name): run on one pytest-xdist worker")


def progress(line: str, path: str | None = None) -> None:
    """Append ``line`` to the RK_TEST_LOG file (or ``path``) and fsync it; no-op when unset."""
    path = path or os.environ.get("RK_TEST_LOG")
    if not path:
        return
    with open(path, "a", encoding="utf-8") as f:
        f.write(line.replace("\n", " ") + "\n")
        f.flush()
        os.fsync(f.fileno())


def outcome_line(report) -> str | None:
    """The progress-log line of one phase report, None for a phase that adds nothing."""
    if report.when == "call":
        word = report.outcome.upper()
    elif report.failed:
        word = "ERROR"  # setup or teardown failed
    elif report.when == "setup" and report.skipped:
        word = "SKIPPED"
    else:
        return None
    msg = ""
    if report.skipped and isinstance(report.longrepr, tuple):
        msg = str(report.longrepr[2])  # (path, line, "Skipped: reason")
    elif report.failed:
        lines = [ln.strip() for ln in (report.longreprtext or "").splitlines() if ln.strip()]
        msg = next(
            (ln for ln in reversed(lines) if ln.startswith("E ")), lines[-1] if lines else ""
        )
    line = f"{word} {report.nodeid} {report.duration:.1f}s"
    return line + (f": {msg[:300]}" if msg else "")


def pytest_runtest_logstart(nodeid, location):
    if not _IS_XDIST_WORKER:
        progress(f"START {nodeid}")


def pytest_runtest_logreport(report):
    line = None if _IS_XDIST_WORKER else outcome_line(report)
    if line:
        progress(line)


def pytest_sessionfinish(session, exitstatus):
    if not _IS_XDIST_WORKER:
        progress(f"SESSION exitstatus={int(exitstatus)}")


_STACK_FILE = None


def _stacks():
    """Where a hard timeout prints the stacks: the RK_TEST_LOG file, else the real stderr."""
    global _STACK_FILE
    path = os.environ.get("RK_TEST_LOG")
    if not path:
        return sys.__stderr__
    if _STACK_FILE is None or _STACK_FILE.name != path:
        _STACK_FILE = open(path, "a", encoding="utf-8")  # stays open for faulthandler
    return _STACK_FILE


class Deadline:
    """The soft (SIGALRM) and hard (faulthandler) limits, ``seconds`` from entry, around one
    test phase. The soft limit needs the main thread, where pytest (and xdist) runs tests."""

    def __init__(self, seconds: float, grace: float, what: str, limit: float):
        self.seconds, self.grace, self.what, self.limit = max(seconds, 0.01), grace, what, limit
        main = threading.current_thread() is threading.main_thread()
        self.soft = main and hasattr(signal, "setitimer")

    def _expired(self, signum, frame):
        raise TestTimeout(f"{self.what} ran past its {self.limit:g} s limit (RK_TEST_TIMEOUT)")

    def __enter__(self):
        # to the progress log when there is one: pytest's capture would swallow stderr
        faulthandler.dump_traceback_later(self.seconds + self.grace, exit=True, file=_stacks())
        if self.soft:
            self._previous = signal.signal(signal.SIGALRM, self._expired)
            signal.setitimer(signal.ITIMER_REAL, self.seconds)
        return self

    def __exit__(self, *exc):
        if self.soft:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, self._previous)
        faulthandler.cancel_dump_traceback_later()
        return False


def phase_deadline(item) -> Deadline | contextlib.nullcontext:
    """What is left of ``item``'s RK_TEST_TIMEOUT budget (counted from its setup) as a
    :class:`Deadline`; a no-op context when the variable is unset or 0."""
    limit = float(os.environ.get("RK_TEST_TIMEOUT") or 0)
    if limit <= 0:
        return contextlib.nullcontext()
    grace = os.environ.get("RK_TEST_TIMEOUT_GRACE")
    grace = float(grace) if grace else max(10.0, limit / 4)
    end = item.stash.setdefault(_TEST_END, time.monotonic() + limit)
    return Deadline(end - time.monotonic(), grace, item.nodeid, limit)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_setup(item):
    with phase_deadline(item):
        yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    with phase_deadline(item):
        yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_teardown(item, nextitem):
    with phase_deadline(item):
        yield
