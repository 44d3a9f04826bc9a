"""Every Triton kernel, every GPU autotune config, compiled offline for sm_90 (H100 / H200).

One test per (kernel, config, dtype, feature variant): it fails when the compile spills
(any stack frame / local memory) or needs more shared memory than the H100 has per block
(232448 B), or does not compile at all, with each triton of ``compilers()``: this
environment's and the GPU image's (installed by the Makefile; spills differ between triton
versions). No GPU is needed
(tests/triton_compile.py: triton's bundled ptxas and cuobjdump); the compiles run in one
interpreter-free child process per triton and test session (the suite runs with
TRITON_INTERPRET=1), and the autotune config lists are read in such a process at collection,
so they are the GPU lists, not the interpreter's.

Each op contributes its cases from one function below; ``CASES`` joins them. A new kernel or
config is covered by adding it there (the config lists are enumerated from the autotuner, so
a new config of an existing kernel needs nothing).
"""

from __future__ import annotations

import pytest
import torch

from triton_compile import (
    GPU_IMAGE_TRITON,
    Case,
    compile_in_subprocess,
    compilers,
    configs_in_subprocess,
    offline_compile_unavailable,
)

_WHY = offline_compile_unavailable()
if _WHY:
    pytest.skip(f"offline sm_90 compile: {_WHY}", allow_module_level=True)


def _variants(**flags):
    """All on/off combinations of the named boolean constexprs, as (id, dict) pairs."""
    out = [("", {})]
    for name, short in flags.items():
        out = [
            (f"{i}-{short}" if on else i, dict(d, **{name: on}))
            for i, d in out
            for on in (False, True)
        ]
    return [(i.strip("-") or "plain", d) for i, d in out]


def _cfg_id(cfg: dict) -> str:
    kw = cfg["kwargs"]
    blocks = "x".join(str(kw[k]) for k in kw if k.startswith("BLOCK"))
    return f"{blocks}_w{cfg['num_warps']}s{cfg['num_stages']}"


def _precision(dt: str) -> dict:
    return dict(INPUT_PRECISION="ieee" if dt == "fp32" else "tf32", UPCAST=False)


def _sig(sig: dict, dt: str) -> dict:
    return {k: t.format(dt=dt) for k, t in sig.items()}


# ------------------------------------------------------------------------ linear_logprob

LL = "rag_kernels.ops.linear_logprob.triton"
_LL_COMMON = dict(
    h_ptr="*{dt}", w_ptr="*{dt}", b_ptr="*{dt}", y_ptr="*i64", rows_ptr="*i64", nact_ptr="*i64"
)
_LL_ROW_GRADS = dict(lse_ptr="*fp32", glp_ptr="*fp32", glse_ptr="*fp32", gs_ptr="*fp32")
_LL_SCALARS = dict(N="i32", V="i32", D="i32", Y_INNER="i32", Y_GROUP="i32")
_LL_KERNELS = {
    # name: (autotuned kernel without its [bits], signature, other constexprs, 16-divisible ints)
    "fwd": (
        "_FWD",
        dict(
            _LL_COMMON,
            m_ptr="*fp32",
            s_ptr="*fp32",
            zt_ptr="*fp32",
            zs_ptr="*fp32",
            **_LL_SCALARS,
            split_len="i32",
            softcap="fp32",
            N_KEY="i32",
        ),
        {},
        ("N", "V", "D", "split_len", "N_KEY"),
    ),
    "dz": (  # the deterministic backward's kernel
        "_DZ",
        dict(
            _LL_COMMON,
            **_LL_ROW_GRADS,
            dz_ptr="*{dt}",
            **_LL_SCALARS,
            softcap="fp32",
            filter_eps="fp32",
            v0="i32",
            c_len="i32",
            dz_stride="i32",
            N_KEY="i32",
        ),
        dict(HAS_GLSE=True, HAS_GS=True, FILTER=True),
        ("N", "V", "D", "v0", "c_len", "dz_stride", "N_KEY"),
    ),
    "bwd_atomic": (
        "_BWD",
        dict(
            _LL_COMMON,
            **_LL_ROW_GRADS,
            dh_ptr="*fp32",
            dw_ptr="*fp32",
            db_ptr="*fp32",
            **_LL_SCALARS,
            softcap="fp32",
            filter_eps="fp32",
            N_KEY="i32",
        ),
        dict(HAS_GLSE=True, HAS_GS=True, NEED_DH=True, NEED_DW=True, NEED_DB=True, FILTER=True),
        ("N", "V", "D", "N_KEY"),
    ),
}


def _linear_logprob_cases():
    """Every GPU autotune config of every kernel; bias x softcap (softcap takes its own
    autotuner, ``[bits, True]``); the other features on (the register-heaviest variant).
    16-bit configs compiled for bf16, fp32 configs for fp32."""
    tuned = [
        (f"{path}[{bits}, {cap}]", name, bits, cap)
        for name, (path, *_) in _LL_KERNELS.items()
        for bits in (16, 32)
        for cap in (False, True)
    ]
    lists = dict(zip(tuned, configs_in_subprocess([(LL, t[0]) for t in tuned]), strict=True))
    params = []
    for (kpath, name, bits, cap), cfgs in lists.items():
        _, sig, flags, div = _LL_KERNELS[name]
        dt = "bf16" if bits == 16 else "fp32"
        for bias in (False, True):
            vid = "-".join(["bias"] * bias + ["softcap"] * cap) or "plain"
            for ci, cfg in enumerate(cfgs):
                case = Case(
                    LL,
                    kpath,
                    _sig(sig, dt),
                    dict(flags, HAS_BIAS=bias, SOFTCAP=cap, **_precision(dt)),
                    divisible=div,
                    config_index=ci,
                )
                ident = f"linear_logprob-{name}-{dt}-{vid}-cfg{ci}_{_cfg_id(cfg)}"
                params.append(pytest.param(case, id=ident))
    return params


# ----------------------------------------------------------------------- token smoothing

TS = "rag_kernels.ops.token_smoothing.triton"
_TS_IN = dict(h_ptr="*{dt}", w_ptr="*{dt}", b_ptr="*{dt}", pi_ptr="*fp32")
_TS_BWD_IN = dict(
    _TS_IN, lse_ptr="*fp32", wsum_ptr="*fp32", g_ptr="*fp32", y_ptr="*i32", glp_ptr="*fp32"
)
_TS_DIMS = dict(K="i32", T="i32", H="i32")
_TS_KERNELS = {
    # name: (kernel, signature, other constexprs, 16-divisible ints, launch_meta's kernel)
    "lse": (
        "token_smoothing_lse_kernel",
        dict(
            _TS_IN,
            y_ptr="*i32",
            m_ptr="*fp32",
            s_ptr="*fp32",
            zt_ptr="*fp32",
            **_TS_DIMS,
            V="i32",
            NTB="i32",
            N="i32",
            split_len="i32",
            softcap="fp32",
        ),
        dict(HAS_Y=True),
        ("H", "V", "split_len"),
        "fwd",
    ),
    "fwd": (
        "token_smoothing_fwd_kernel",
        dict(
            _TS_IN,
            lse_ptr="*fp32",
            out_ptr="*fp32",
            wsum_ptr="*fp32",
            **_TS_DIMS,
            V="i32",
            NTB="i32",
            B="i32",
            split_len="i32",
            softcap="fp32",
        ),
        {},
        ("H", "V", "split_len"),
        "fwd",
    ),
    "dz": (  # the deterministic backward's kernel
        "token_smoothing_dz_kernel",
        dict(
            _TS_BWD_IN,
            live_ptr="*i1",
            dz_ptr="*{dt}",
            **_TS_DIMS,
            NTB="i32",
            NBT="i32",
            softcap="fp32",
            v0="i32",
            c_len="i32",
            dz_stride="i32",
        ),
        dict(HAS_G=True, HAS_GLP=True),
        ("H", "v0", "c_len", "dz_stride"),
        "dz",
    ),
    "bwd_atomic": (
        "token_smoothing_bwd_kernel",
        dict(
            _TS_BWD_IN,
            dh_ptr="*fp32",
            dw_ptr="*fp32",
            db_ptr="*fp32",
            **_TS_DIMS,
            V="i32",
            NTB="i32",
            NBT="i32",
            softcap="fp32",
        ),
        dict(HAS_G=True, HAS_GLP=True, NEED_DH=True, NEED_DW=True, NEED_DB=True),
        ("H", "V"),
        "bwd",
    ),
}
# Documents per query: K = 8 (KP x BT = 8 x 8 rows) with bias x softcap; the extremes K = 1
# (1 x 64) and K = 64 (64 x 1), and the wide tiles of K = 65 (128 rows) and K = 129 ... 256
# (MAX_DOCS, 256 rows), with every feature on. T = 256.
_TS_DOCS = {8: "all", 1: "full", 64: "full", 65: "full", 256: "full"}


def _token_smoothing_cases():
    """The fixed GPU launch configuration (``launch_meta``), bf16 and fp32."""
    params = []
    for name, (kernel, sig, flags, div, kind) in _TS_KERNELS.items():
        for dt in ("bf16", "fp32"):
            for K, which in _TS_DOCS.items():
                variants = _variants(HAS_BIAS="bias", SOFTCAP="softcap")
                for vid, v in variants if which == "all" else variants[-1:]:
                    case = Case(
                        TS,
                        kernel,
                        _sig(sig, dt),
                        dict(flags, **v, **_precision(dt)),
                        divisible=div,
                        launch_meta=("launch_meta", [K, 256, kind, dt == "fp32"]),
                    )
                    ident = f"token_smoothing-{name}-{dt}-{vid}-K{K}"
                    params.append(pytest.param(case, id=ident))
    return params


# --------------------------------------------------------------------------- marginalize

MG = "rag_kernels.ops.marginalize.triton"


def _marginalize_cases():
    """The launch's tile, from ``launch_tile`` (all K in one tile, T chunked to a 4096-element
    tile, 1024 in float64, 8 warps), for K = 1 ... 128 and a long T."""
    from rag_kernels.ops.marginalize.triton import launch_tile

    params = []
    for dt, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp64", torch.float64)):
        sig = dict(
            lp_ptr=f"*{dt}",
            s_ptr=f"*{dt}",
            tm_ptr="*u8",
            dm_ptr="*u8",
            loss_ptr=f"*{dt}",
            dlp_ptr=f"*{dt}",
            ds_ptr=f"*{dt}",
            K="i32",
            T="i32",
        )
        for K in (1, 2, 8, 16, 32, 64, 128):
            block_k, block_t, warps = launch_tile(K, 4096, dtype)
            for mode in ("sequence", "token"):
                consts = dict(
                    HAS_TM=True,
                    HAS_DM=True,
                    TOKEN_MODE=mode == "token",
                    BLOCK_K=block_k,
                    BLOCK_T=block_t,
                    F64=dt == "fp64",
                )
                ident = f"marginalize-{dt}-{mode}-K{block_k}xT{block_t}-w{warps}"
                case = Case(MG, "marginalize_kernel", sig, consts, num_warps=warps)
                params.append(pytest.param(case, id=ident))
    return params


# --------------------------------------------------------------------------- contrastive

CT = "rag_kernels.ops.contrastive.triton"
_CT_PTRS = dict(
    q_ptr="*{dt}",
    d_ptr="*{dt}",
    scale_ptr="*fp32",
    pos_ptr="*i64",
    mask_ptr="*u8",
    ids_ptr="*i64",
    table_ptr="*u8",
    lse_ptr="*fp32",
    plse_ptr="*fp32",
)
_CT_KERNELS = {
    # name: (autotuned kernel without its [bits], signature, other constexprs)
    "fwd": (
        "_FWD",
        dict(_CT_PTRS, B="i32", M="i32", D="i32", U="i32", stride_mask="i32", split_len="i32"),
        {},
    ),
    "bwd": (  # every output on: the score gradient G and the dscale partials
        "_BWD",
        dict(
            _CT_PTRS,
            g_ptr="*fp32",
            grad_ptr="*{dt}",
            parts_ptr="*fp32",
            B="i32",
            M="i32",
            D="i32",
            U="i32",
            stride_mask="i32",
            j_start="i32",
            n_cols="i32",
        ),
        dict(STORE_G=True, NEED_DSCALE=True),
    ),
}
# 16-divisible whatever the batch: the host zero-pads D and the mask / id-table rows to
# multiples of 16, and split_len / j_start are multiples of 128.
_CT_HOST_ALIGNED = ("D", "U", "stride_mask", "split_len", "j_start")


def _contrastive_cases():
    """Every GPU autotune config of both kernels, bf16 (16-bit list) and fp32; index / mask
    positives x doc ids; two specialisations: every size 16-divisible ("aligned") and odd
    B / M / chunk width ("oddBM", only what the host aligns divisible)."""
    paths = [(CT, f"{path}[{bits}]") for path, *_ in _CT_KERNELS.values() for bits in (16, 32)]
    configs = iter(configs_in_subprocess(paths))
    params = []
    for name, (path, sig, flags) in _CT_KERNELS.items():
        sig = dict(sig, B_KEY="i32", M_KEY="i32")
        ints = tuple(k for k, t in sig.items() if t == "i32")
        specs = (("aligned", ints), ("oddBM", tuple(k for k in ints if k in _CT_HOST_ALIGNED)))
        for bits, dt in ((16, "bf16"), (32, "fp32")):
            cfgs = next(configs)
            for spec, div in specs:
                for vid, v in _variants(MASK_MODE="mask", HAS_IDS="ids"):
                    for ci, cfg in enumerate(cfgs):
                        case = Case(
                            CT,
                            f"{path}[{bits}]",
                            _sig(sig, dt),
                            dict(flags, **v, **_precision(dt)),
                            divisible=div,
                            config_index=ci,
                        )
                        ident = f"contrastive-{name}-{dt}-{vid}-{spec}-cfg{ci}_{_cfg_id(cfg)}"
                        params.append(pytest.param(case, id=ident))
    return params


CASES = (
    _linear_logprob_cases() + _token_smoothing_cases() + _marginalize_cases() + _contrastive_cases()
)


# Every case with this environment's triton and with the GPU image's (the one a first GPU
# run compiles with: spills differ between versions), when the Makefile installed it.
COMPILERS = compilers()


@pytest.fixture(scope="module")
def compiled(request):
    """Resources of every selected case, compiled in one child process per triton on first
    use."""
    mine: dict[str, dict] = {}
    for item in request.session.items:
        spec = getattr(item, "callspec", None)
        if item.module is request.module and spec is not None and "compiler" in spec.params:
            mine.setdefault(spec.params["compiler"], {})[spec.id] = spec.params["case"]
    sites = dict(COMPILERS)
    out = {}
    for name, cases in mine.items():
        results = compile_in_subprocess(list(cases.values()), site=sites[name])
        out.update(zip(cases, results, strict=True))
    return out


@pytest.mark.parametrize("compiler", [name for name, _ in COMPILERS])
@pytest.mark.parametrize("case", CASES)
def test_compiles_for_sm90_without_spills(case, compiler, compiled, request):
    ident = request.node.callspec.id
    res = compiled[ident]
    assert not isinstance(res, str), f"compile failed ({compiler}): {res}"
    assert not res.problems(), f"{compiler}: {res.problems()}"


def test_the_gpu_images_triton_is_compiled_with():
    """The Makefile installs the GPU image's triton for the cases above; without it they
    would hold only for this environment's triton, which a GPU run does not use."""
    assert len(COMPILERS) == 2, (
        f"no second triton in {GPU_IMAGE_TRITON} (make install puts the GPU image's there)"
    )
