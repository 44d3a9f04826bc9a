"""Offline sm_90 (H100 / H200) compiles of ``@triton.jit`` kernels, for the resource tests.

No GPU is needed: ``triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))`` runs the
whole pipeline down to a cubin with the ``ptxas`` bundled in the triton wheel, and the wheel's
``cuobjdump`` reads the cubin's resource usage (registers, stack frame = register spills and
local arrays, static shared memory); the dynamic shared memory a launch requests is
``metadata.shared``, the number triton itself checks against the device limit at launch.

Compiling needs a process where ``TRITON_INTERPRET`` is off *before* triton and the kernel
modules are imported (under the interpreter ``@triton.jit`` builds interpreted functions, and
our kernel modules pick tiny interpreter-only autotune configs). The test suite runs with
``TRITON_INTERPRET=1`` (tests/conftest.py), so tests use the subprocess entry points:

* :func:`configs_in_subprocess` — the GPU autotune configs of ``triton.autotune``-wrapped kernels;
* :func:`compile_in_subprocess` — compile a list of :class:`Case` and return :class:`Resources`.

In a non-interpreter process, :func:`compile_sm90` and :func:`autotune_configs` do the same
in-process. Example::

    case = Case("rag_kernels.ops.marginalize.triton", "marginalize_kernel",
                signature=dict(lp_ptr="*fp32", ..., K="i32", T="i32"),
                constexprs=dict(HAS_TM=True, ..., BLOCK_K=8, BLOCK_T=512, F64=False),
                num_warps=4, num_stages=3)
    (res,) = compile_in_subprocess([case])
    assert not res.problems(), res
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field

# H100 / H200: 227 KiB of dynamic shared memory per block (opt-in maximum).
SM90_MAX_SHARED = 232448
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass(frozen=True)
class Resources:
    """What one compiled kernel uses per thread / per block on sm_90."""

    kernel: str
    registers: int  # per thread
    stack_bytes: int  # per-thread stack frame: register spills (and local arrays); 0 wanted
    local_bytes: int  # per-thread local memory outside the stack frame
    shared_bytes: int  # dynamic shared memory per block (metadata.shared, checked at launch)
    static_shared_bytes: int  # static shared memory reported by cuobjdump
    num_warps: int
    num_stages: int

    def problems(self, max_shared: int = SM90_MAX_SHARED) -> list[str]:
        """Human-readable reasons this compile would spill or not launch ([] when fine)."""
        out = []
        if self.stack_bytes or self.local_bytes:
            out.append(
                f"{self.kernel}: spills ({self.stack_bytes} B stack, {self.local_bytes} B local, "
                f"{self.registers} registers)"
            )
        if self.shared_bytes > max_shared:
            out.append(f"{self.kernel}: {self.shared_bytes} B shared memory > {max_shared}")
        return out


@dataclass(frozen=True)
class Case:
    """One compile: ``kernel`` looked up in ``module`` (:func:`resolve`: ``"name"`` or e.g.
    ``"_BWD[16, False]"``; a ``@triton.jit`` function or its ``triton.autotune`` wrapper)
    with a ``signature`` for every non-constexpr argument (``"*bf16"``, ``"i32"``,
    ``"fp32"``, ...), the ``constexprs`` (all of them, config values included, unless
    ``config_index`` is given: then that GPU autotune config's values, warps and stages are
    used and override these; or ``launch_meta = (function path, args)``: a function of the
    module, called in the compiling process, whose returned dict of constexprs (and
    ``num_warps`` / ``num_stages``) is merged in the same way — for kernels launched with a
    computed configuration rather than autotuned), and the int arguments in ``divisible``
    specialised as 16-divisible (pointers always are: what a launch with aligned tensors
    specialises)."""

    module: str
    kernel: str
    signature: dict
    constexprs: dict = field(default_factory=dict)
    num_warps: int = 4
    num_stages: int = 3
    divisible: tuple = ()
    config_index: int | None = None
    launch_meta: tuple | None = None


# The GPU image's triton (the version a first GPU run compiles with; register use and spills
# differ between triton versions), installed by the Makefile next to the venv's own:
# `pip install --no-deps --target <venv>/gpu-image-triton triton==<version>`.
GPU_IMAGE_TRITON = os.environ.get(
    "RK_GPU_IMAGE_TRITON", os.path.join(sys.prefix, "gpu-image-triton")
)


def compilers() -> list[tuple[str, str | None]]:
    """``(name, site)`` of each triton the compile tests use: this environment's
    (``site`` None) and, when installed, the GPU image's (``site`` = the folder prepended to
    the compile worker's ``PYTHONPATH``); ``name`` is ``triton<version>``."""
    import triton

    out = [(f"triton{triton.__version__}", None)]
    if os.path.isdir(os.path.join(GPU_IMAGE_TRITON, "triton")):
        for entry in sorted(os.listdir(GPU_IMAGE_TRITON)):
            m = re.fullmatch(r"triton-(.+)\.dist-info", entry)
            if m and m.group(1) != triton.__version__:
                out.append((f"triton{m.group(1)}", GPU_IMAGE_TRITON))
    return out


def _tools_dir() -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


def offline_compile_unavailable() -> str | None:
    """Why sm_90 compiles cannot run here (no ptxas / cuobjdump / API), or None."""
    try:
        import triton
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except ImportError as exc:
        return f"triton offline compile API unavailable: {exc}"
    del triton
    for tool in ("ptxas", "cuobjdump"):
        if not os.path.exists(os.path.join(_tools_dir(), tool)):
            return f"no {tool} in the triton wheel"
    return None


def _jit_fn(kernel):
    """The ``JITFunction`` under autotune / heuristics wrappers."""
    from triton.runtime.jit import JITFunction

    fn = kernel
    while not isinstance(fn, JITFunction) and hasattr(fn, "fn"):
        fn = fn.fn
    if not isinstance(fn, JITFunction):
        raise RuntimeError(
            f"{getattr(fn, '__name__', fn)!r} is not a compilable JITFunction (was it imported "
            "with TRITON_INTERPRET=1? use compile_in_subprocess)"
        )
    return fn


def autotune_configs(kernel) -> list:
    """The ``triton.Config`` list of a ``triton.autotune``-wrapped kernel (``kernel.configs``)."""
    configs = getattr(kernel, "configs", None)
    if configs is None:
        raise TypeError(f"{kernel!r} is not a triton.autotune-wrapped kernel (no .configs)")
    return list(configs)


def config_dict(cfg) -> dict:
    """A ``triton.Config`` as plain data: ``{"kwargs", "num_warps", "num_stages"}``."""
    return {"kwargs": dict(cfg.kwargs), "num_warps": cfg.num_warps, "num_stages": cfg.num_stages}


def compile_sm90(
    kernel,
    signature: dict,
    constexprs: dict,
    *,
    num_warps: int = 4,
    num_stages: int = 3,
    divisible=(),
) -> Resources:
    """Compile ``kernel`` for sm_90 offline and return its :class:`Resources` (in-process; the
    process must not run the interpreter). Raises ``ValueError`` naming an argument that is
    neither in ``signature`` nor in ``constexprs``."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = _jit_fn(kernel)
    names = list(fn.arg_names)
    sig = dict(signature)
    sig.update({k: "constexpr" for k in constexprs})
    missing = [n for n in names if n not in sig]
    unknown = [n for n in sig if n not in names]
    if missing or unknown:
        raise ValueError(
            f"{fn.__name__}: arguments missing from signature/constexprs: {missing}; "
            f"unknown: {unknown}"
        )
    sig = {n: sig[n] for n in names}
    div = set(divisible)
    attrs = {
        (names.index(k),): [["tt.divisibility", 16]]
        for k, v in sig.items()
        if (v.startswith("*") or k in div) and v != "constexpr"
    }
    src = ASTSource(fn, sig, dict(constexprs), attrs)
    compiled = triton.compile(
        src,
        target=GPUTarget("cuda", 90, 32),
        options=dict(num_warps=num_warps, num_stages=num_stages),
    )
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        usage = subprocess.run(
            [os.path.join(_tools_dir(), "cuobjdump"), "--dump-resource-usage", f.name],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", usage)
    if m is None:
        raise RuntimeError(f"{fn.__name__}: unreadable cuobjdump output:\n{usage}")
    regs, stack, static_shared, local = (int(x) for x in m.groups())
    return Resources(
        kernel=fn.__name__,
        registers=regs,
        stack_bytes=stack,
        local_bytes=local,
        shared_bytes=int(compiled.metadata.shared),
        static_shared_bytes=static_shared,
        num_warps=num_warps,
        num_stages=num_stages,
    )


def resolve(module: str, path: str):
    """``module`` imported, then ``path`` looked up in it: attribute names joined by ``.``
    with optional ``[key]`` subscripts (a Python literal, else a bare string), e.g.
    ``"_BWD[16, True]"``."""
    obj = importlib.import_module(module)
    for name, key in re.findall(r"\.?(\w+)|\[([^\]]+)\]", path):
        if name:
            obj = getattr(obj, name)
        else:
            try:
                key = ast.literal_eval(key)
            except (ValueError, SyntaxError):
                key = key.strip()
            obj = obj[key]
    return obj


def _compile_case(case: Case) -> Resources:
    kernel = resolve(case.module, case.kernel)
    consts, warps, stages = dict(case.constexprs), case.num_warps, case.num_stages
    if case.config_index is not None:
        cfg = autotune_configs(kernel)[case.config_index]
        consts.update(cfg.kwargs)
        warps, stages = cfg.num_warps, cfg.num_stages
    if case.launch_meta is not None:
        fn_path, args = case.launch_meta
        meta = dict(resolve(case.module, fn_path)(*args))
        warps = meta.pop("num_warps", warps)
        stages = meta.pop("num_stages", stages)
        consts.update(meta)
    return compile_sm90(
        kernel,
        case.signature,
        consts,
        num_warps=warps,
        num_stages=stages,
        divisible=case.divisible,
    )


# ------------------------------------------------------------------------ subprocess side


def _child_env(site: str | None = None) -> dict:
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_DEFAULT_FP_FUSION="1")
    env["RAG_KERNELS_AUTOTUNE"] = "1"  # every GPU config, not only the first
    env["PYTHONPATH"] = os.pathsep.join(p for p in (site, _REPO, env.get("PYTHONPATH")) if p)
    return env


def _run_child(request: dict, timeout: float, site: str | None = None) -> dict:
    proc = subprocess.run(
        [sys.executable, os.path.abspath(__file__)],
        input=json.dumps(request),
        capture_output=True,
        text=True,
        env=_child_env(site),
        timeout=timeout,
        cwd=_REPO,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"offline compile worker failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def configs_in_subprocess(kernels: list[tuple[str, str]], timeout: float = 300) -> list[list]:
    """For each ``(module, path)`` autotuned kernel (``path`` as in :func:`resolve`), its GPU configs as :func:`config_dict`
    dicts (the interpreter-free process sees the real lists, ``RAG_KERNELS_AUTOTUNE=1``)."""
    out = _run_child({"configs": [list(k) for k in kernels]}, timeout)
    return out["configs"]


def compile_in_subprocess(
    cases: list[Case], timeout: float = 1800, site: str | None = None
) -> list[Resources | str]:
    """Compile every case in one interpreter-free child process (with the triton found first
    in ``site`` when given: :func:`compilers`); per case a :class:`Resources` or the error
    text (a compile error fails that case only)."""
    out = _run_child({"cases": [dataclasses.asdict(c) for c in cases]}, timeout, site)
    if site is not None and not out["triton"].startswith(os.path.abspath(site)):
        raise RuntimeError(f"the compile worker imported {out['triton']}, not the one in {site}")
    return [Resources(**r) if isinstance(r, dict) else r for r in out["results"]]


def _child_main() -> None:
    request = json.loads(sys.stdin.read())
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise SystemExit("the compile worker must run with TRITON_INTERPRET=0")
    import triton

    reply: dict = {"triton": os.path.abspath(triton.__file__)}
    if "configs" in request:
        reply["configs"] = [
            [config_dict(c) for c in autotune_configs(resolve(m, a))] for m, a in request["configs"]
        ]
    if "cases" in request:
        results = []
        for c in request["cases"]:
            c["divisible"] = tuple(c.get("divisible", ()))
            if c.get("launch_meta") is not None:
                c["launch_meta"] = tuple(c["launch_meta"])
            try:
                results.append(dataclasses.asdict(_compile_case(Case(**c))))
            except Exception as exc:  # reported per case by the caller's test
                results.append(f"{type(exc).__name__}: {exc}"[-4000:])
        reply["results"] = results
    print(json.dumps(reply))


if __name__ == "__main__":
    _child_main()
