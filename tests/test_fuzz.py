"""Seeded fuzz suite of every public op: random valid and invalid cases, each op's batch run in
a subprocess (tests/fuzz_worker.py) so that a crash (SIGFPE, SIGSEGV, abort) or a hang is a
failed test naming the op, the implementation, the case and its seed, not a dead pytest.

* ``test_fuzz_valid[<op>-<impl>]``: random shapes (odd, size-1 and empty B / T), dtypes
  (float64, float32, bfloat16, float16), masks, ignore_index placements, NaN / +-inf in masked
  positions (must change nothing, gradients included), NaN in active inputs (must reach the
  output), options (softcap, bias, label smoothing, modes, reductions, shared targets).
  Values and gradients (random upstream gradient) are compared with the float64 reference
  (``impl="reference"``; an independent float64 oracle for ops without implementations):
  1e-9 (float64) / 1e-4 (float32) relative to scale, 16-bit: 2x plain PyTorch's error in the
  same dtype plus 2 units of roundoff. The rules are in tests/fuzz_worker.py.
* ``test_fuzz_invalid[<op>]``: each bad-input mutation of the op (wrong dtype / rank / shape /
  device, K=0, H=0, V=0, bad option values, out-of-range ids, non-finite doc scores, ...) must
  raise TypeError or ValueError whose message names the offending argument.
* ``test_fuzz_crash_reporting``: the harness itself reports a crash / hang of a case.

Scale: ``RAG_KERNELS_FUZZ_CASES=500`` valid cases per op (default: a per-op count sized for
CI, ~3700 cases in all, ~25 s on 2 idle cores), ``RAG_KERNELS_FUZZ_SEED`` another seed,
``RAG_KERNELS_FUZZ_JOBS`` parallel worker processes (default: the CPU count, at most 4, shared
with pytest-xdist workers), ``RAG_KERNELS_FUZZ_TIMEOUT`` seconds per worker process.
Reproduce a reported case with the command printed in the failure.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
WORKER = HERE / "fuzz_worker.py"
PREFIX = "@@FUZZ "
# parallel worker processes (per pytest-xdist worker: the CPUs are shared among them)
_XDIST = max(1, int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))
JOBS = int(os.environ.get("RAG_KERNELS_FUZZ_JOBS", "0")) or max(
    1, min(os.cpu_count() or 1, 4) // _XDIST
)
MAX_REPORTED = 8

_spec = importlib.util.spec_from_file_location("rag_kernels_fuzz_worker", WORKER)
fw = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = fw  # dataclasses look their module up there
_spec.loader.exec_module(fw)
SEED = int(os.environ.get("RAG_KERNELS_FUZZ_SEED", fw.DEFAULT_SEED))

OPS = tuple(fw.OPS)
IMPLS = {op: fw.op_impls(op) for op in OPS}
# CPU seconds per valid case (measured; invalid cases are nearly free), to balance the bundles
COST_PER_CASE = {
    "linear_logprob": 0.022,
    "rag_sequence_loss": 0.026,
    "rag_token_loss": 0.028,
    "document_posterior": 0.001,
    "rag_loss": 0.021,
    "generator_feedback": 0.009,
    "token_smoothing": 0.035,
    "token_smoothing_with_logprob": 0.041,
    "rag_sequence_get_nll": 0.017,
    "rag_token_get_nll": 0.036,
    "contrastive_loss": 0.019,
}


def _cost(op: str) -> float:
    return 0.5 + COST_PER_CASE.get(op, 0.002) * fw.num_cases(op)[0]


def _env() -> dict:
    env = dict(os.environ)
    env.setdefault("TRITON_INTERPRET", "1")
    # OpenMP threads sleep instead of spinning while they wait: the kernels' parallel regions
    # are tiny here, and on a loaded CI machine spinning threads multiply the run time
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    env["PYTHONUNBUFFERED"] = "1"
    env.pop("PYTEST_CURRENT_TEST", None)
    return env


def _timeout(n_cases: int) -> float:
    raw = os.environ.get("RAG_KERNELS_FUZZ_TIMEOUT")
    return float(raw) if raw else 60.0 + 1.0 * n_cases


def _signal_name(rc: int) -> str:
    if rc < 0:
        try:
            return signal.Signals(-rc).name
        except ValueError:
            return f"signal {-rc}"
    return f"exit status {rc}"


def _text(out: bytes | str | None) -> str:
    """A TimeoutExpired's partial output (bytes even with text=True)."""
    return out.decode(errors="replace") if isinstance(out, bytes) else (out or "")


def _parse(stdout: str) -> list[dict]:
    events = []
    for line in stdout.splitlines():
        if line.startswith(PREFIX):
            try:
                events.append(json.loads(line[len(PREFIX) :]))
            except json.JSONDecodeError:
                pass
    return events


def _counts(op: str) -> tuple[int, int]:
    return (5, 0) if op == "_selftest" else fw.num_cases(op)


def _crash_record(ev: dict, op: str, how: str, stderr: str) -> dict:
    case = ev.get("case", -1)
    kind = "valid" if 0 <= case < _counts(op)[0] else "invalid" if case >= 0 else "valid"
    return {
        "op": op,
        "case": case,
        "seed": ev.get("seed"),
        "impl": ev.get("impl", "*"),
        "dtype": ev.get("dtype", "-"),
        "desc": ev.get("desc", {}),
        "kind": kind,
        "phase": ev.get("phase"),
        "status": "crash",
        "how": how,
        "stderr": stderr[-3000:],
    }


def run_ops(ops: list[str], timeout: float | None = None) -> list[dict]:
    """Every case of ``ops`` in one worker subprocess after the other; a worker that dies
    (signal, abort, non-zero exit) or hangs is recorded against the case it was running and
    a new one resumes after that case."""
    records: list[dict] = []
    pos = (0, 0)  # (index into ops, case)
    while pos[0] < len(ops):
        rest = ops[pos[0] :]
        limit = timeout or _timeout(sum(sum(_counts(op)) for op in rest))
        cmd = [
            sys.executable,
            str(WORKER),
            ",".join(rest),
            "--start",
            f"{rest[0]}:{pos[1]}",
            "--seed",
            str(SEED),
        ]
        try:
            proc = subprocess.run(
                cmd, capture_output=True, text=True, timeout=limit, env=_env(), cwd=ROOT
            )
            stdout, stderr, how = proc.stdout, proc.stderr, _signal_name(proc.returncode)
            finished = proc.returncode == 0
        except subprocess.TimeoutExpired as exc:
            stdout, stderr = _text(exc.stdout), _text(exc.stderr)
            how, finished = f"timeout after {limit:.0f} s (hang?)", False
        events = _parse(stdout)
        records += [e for e in events if e.get("ev") == "result"]
        if finished and any(e.get("ev") == "done" for e in events):
            break
        marks = [e for e in events if e.get("ev") in ("begin", "op-done")]
        last = marks[-1] if marks else None
        if last is not None and last["ev"] == "begin":  # died inside a case: resume after it
            op = last["op"]
            records.append(_crash_record(last, op, how, stderr))
            i = ops.index(op)
            pos = (i, last["case"] + 1) if last["case"] + 1 < sum(_counts(op)) else (i + 1, 0)
        else:  # died outside any case (start-up, between ops): report it, skip that op
            i = ops.index(last["op"]) + 1 if last is not None else pos[0]
            if i >= len(ops):
                records.append(_crash_record({}, ops[-1], how + " after its last case", stderr))
                break
            records.append(
                _crash_record({"case": pos[1] if i == pos[0] else 0}, ops[i], how, stderr)
            )
            pos = (i + 1, 0)
    return records


def bundles(ops: list[str], n: int) -> list[list[str]]:
    """``ops`` in ``n`` worker processes of about equal cost (longest first): fewer processes
    than ops, since every one pays for importing torch, triton and the kernels."""
    n = max(1, min(n, len(ops)))
    groups: list[list[str]] = [[] for _ in range(n)]
    load = [0.0] * n
    for op in sorted(ops, key=lambda o: -_cost(o)):
        k = load.index(min(load))
        groups[k].append(op)
        load[k] += _cost(op)
    return [g for g in groups if g]


class _Runs:
    """The selected ops' cases run once per test session, split into bundles (one worker
    process each) run in parallel from the start. Under pytest-xdist the pytest processes
    share the bundles through a directory: whoever creates ``<bundle>.lock`` first runs it and
    writes ``<bundle>.json``; the others wait for that file."""

    def __init__(self, ops: list[str], shared: Path):
        self._dir = shared
        self._done: dict[str, list[dict]] = {}
        self._bundles = bundles(ops, JOBS * _XDIST)
        self._pool = ThreadPoolExecutor(max_workers=JOBS)
        for group in self._bundles:
            self._pool.submit(self._claim_and_run, group)

    @staticmethod
    def _name(group: list[str]) -> str:
        return "+".join(group)

    def _claim_and_run(self, group: list[str]) -> None:
        name = self._name(group)
        try:
            os.close(os.open(self._dir / f"{name}.lock", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return  # another thread / pytest process runs it
        try:
            records = run_ops(group)
        except Exception as exc:  # the harness itself failed: report it in the ops' tests
            records = [
                {
                    "op": op,
                    "case": -1,
                    "seed": None,
                    "kind": "valid",
                    "impl": "*",
                    "dtype": "-",
                    "status": "harness-error",
                    "desc": {},
                    "error": f"{type(exc).__name__}: {exc}",
                }
                for op in group
            ]
        tmp = self._dir / f"{name}.json.{os.getpid()}"
        tmp.write_text(json.dumps(records))
        os.replace(tmp, self._dir / f"{name}.json")

    def get(self, op: str) -> list[dict]:
        if op not in self._done:
            group = next((g for g in self._bundles if op in g), [op])
            result = self._dir / f"{self._name(group)}.json"
            self._claim_and_run(group)  # no-op when someone else has it
            n_cases = sum(sum(fw.num_cases(o)) for o in group)
            deadline = time.monotonic() + 3 * _timeout(n_cases) + 60
            while not result.exists():
                if time.monotonic() > deadline:
                    pytest.fail(f"the fuzz run of {group} never reported (in {self._dir})")
                time.sleep(0.1)
            for o in group:
                self._done[o] = []
            for r in json.loads(result.read_text()):
                self._done.setdefault(r["op"], []).append(r)
        return self._done[op]

    def close(self):
        self._pool.shutdown(wait=False, cancel_futures=True)


@pytest.fixture(scope="session")
def fuzz_runs(request, tmp_path_factory):
    wanted = []
    for item in request.session.items:
        callspec = getattr(item, "callspec", None)
        if item.module.__name__ == __name__ and callspec and "op" in callspec.params:
            if callspec.params["op"] not in wanted:
                wanted.append(callspec.params["op"])
    base = tmp_path_factory.getbasetemp()
    shared = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "rag_kernels_fuzz"
    shared.mkdir(parents=True, exist_ok=True)
    runs = _Runs(wanted, shared)
    yield runs
    runs.close()


def _repro(r: dict) -> str:
    seed = "" if SEED == fw.DEFAULT_SEED else f" --seed {SEED}"
    cases = os.environ.get("RAG_KERNELS_FUZZ_CASES")
    env = f"RAG_KERNELS_FUZZ_CASES={cases} " if cases else ""
    return (
        f"{env}TRITON_INTERPRET=1 .venv/bin/python tests/fuzz_worker.py {r['op']} "
        f"--only {r['case']}{seed} -v"
    )


def _describe(r: dict) -> str:
    head = (
        f"[{r['status']}] {r['op']} case {r['case']} (seed {r['seed']}) impl={r['impl']} "
        f"dtype={r['dtype']}"
    )
    lines = [head, f"    case: {json.dumps(r.get('desc', {}), default=str)}"]
    if r["status"] == "crash":
        lines.append(f"    worker died: {r['how']} during phase {r.get('phase')!r}")
        tail = (r.get("stderr") or "").strip().splitlines()[-6:]
        lines += [f"    stderr: {t}" for t in tail]
    for p in r.get("problems") or []:
        lines.append(f"    {json.dumps(p, default=str)}")
    for key in ("expected", "error"):
        if r.get(key):
            lines.append(f"    {key}: {r[key]}")
    if r.get("traceback"):
        lines += ["    " + t for t in r["traceback"].strip().splitlines()[-4:]]
    lines.append(f"    repro: {_repro(r)}")
    return "\n".join(lines)


def _check(records: list[dict], what: str, good: tuple[str, ...]) -> None:
    assert records, f"no fuzz cases ran for {what}"
    bad = [r for r in records if r["status"] not in good]
    if bad:
        shown = "\n".join(_describe(r) for r in bad[:MAX_REPORTED])
        more = f"\n... and {len(bad) - MAX_REPORTED} more" if len(bad) > MAX_REPORTED else ""
        pytest.fail(
            f"{len(bad)} of {len(records)} fuzz results failed for {what}:\n{shown}{more}",
            pytrace=False,
        )


VALID = [pytest.param(op, impl, id=f"{op}-{impl}") for op in OPS for impl in IMPLS[op]]


@pytest.mark.parametrize("op,impl", VALID)
def test_fuzz_valid(fuzz_runs, op, impl):
    records = [r for r in fuzz_runs.get(op) if r["kind"] == "valid" and r["impl"] in (impl, "*")]
    _check(records, f"{op} impl={impl}", ("ok",))


@pytest.mark.parametrize("op", [pytest.param(op, id=op) for op in OPS])
def test_fuzz_invalid(fuzz_runs, op):
    records = [r for r in fuzz_runs.get(op) if r["kind"] == "invalid" or r["impl"] == "*"]
    _check(records, f"{op} (invalid inputs)", ("expected-error",))


def test_fuzz_crash_reporting():
    """The harness turns a crashing / hanging case into a record and carries on after it."""
    records = run_ops(["_selftest"], timeout=3.0)
    by_case = {r["case"]: r for r in records}
    assert sorted(by_case) == [0, 1, 2, 3, 4], records
    assert by_case[0]["status"] == by_case[4]["status"] == "ok"
    assert by_case[1]["status"] == "crash" and "SIGSEGV" in by_case[1]["how"]
    assert by_case[2]["status"] == "crash" and "SIGFPE" in by_case[2]["how"]
    assert by_case[3]["status"] == "crash" and "timeout" in by_case[3]["how"]
    assert "SIGSEGV" in _describe(by_case[1]) and "--only 1" in _describe(by_case[1])
