"""Architecture tests: layering, import cycles, kernel-only import, the registry contract,
no silent slow path, validate-once / one host sync, and the autocast contract.

The static checks (layering, cycles, private names) parse the sources with :mod:`ast` and
execute nothing; the others exercise the public API on small CPU tensors.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import json
import os
import re
import subprocess
import sys
import textwrap
import traceback
import types
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import rag_kernels as rk
from rag_kernels.ops import registry
from rag_kernels.ops import validation as V

ROOT = Path(__file__).resolve().parents[1]
PKG = "rag_kernels"
OPS = ("linear_logprob", "marginalize", "token_smoothing", "contrastive")
OP_FILES = {"__init__.py", "reference.py", "cpu.py", "triton.py"}

# ---------------------------------------------------------------------------------------
# static import analysis (no imports executed)
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModInfo:
    name: str
    path: Path
    is_package: bool


@dataclass(frozen=True)
class Import:
    importer: str  # dotted module name of the importing file
    line: int
    base: str  # the module named by the statement (``from <base> import ...``)
    target: str  # the module actually imported (``base.name`` when that is a module)
    names: tuple[str, ...]  # names bound by ``from base import names`` (empty for ``import``)
    in_function: bool


def index_modules(pkg_dir: Path) -> dict[str, ModInfo]:
    """Every ``.py`` file (and compiled extension) under ``pkg_dir`` by dotted module name."""
    root = pkg_dir.name
    mods: dict[str, ModInfo] = {}
    for path in sorted(pkg_dir.rglob("*.py")):
        if "__pycache__" in path.parts:
            continue
        rel = path.relative_to(pkg_dir.parent).with_suffix("")
        parts = list(rel.parts)
        is_pkg = parts[-1] == "__init__"
        if is_pkg:
            parts = parts[:-1]
        mods[".".join(parts)] = ModInfo(".".join(parts), path, is_pkg)
    for ext in ("*.so", "*.pyd"):
        for path in sorted(pkg_dir.rglob(ext)):
            rel = path.relative_to(pkg_dir.parent)
            parts = [*rel.parts[:-1], rel.name.split(".")[0]]
            mods.setdefault(".".join(parts), ModInfo(".".join(parts), path, False))
    assert root in mods, f"{pkg_dir} is not a package (no __init__.py)"
    return mods


def _package_of(info: ModInfo) -> str:
    return info.name if info.is_package else info.name.rpartition(".")[0]


def _resolve_relative(info: ModInfo, level: int, module: str | None) -> str:
    parts = _package_of(info).split(".")
    if level - 1 > len(parts) - 1:
        raise AssertionError(f"{info.path}: relative import beyond the top-level package")
    base = parts[: len(parts) - (level - 1)]
    return ".".join(base + ([module] if module else []))


def _in_root(name: str, root: str) -> bool:
    return name == root or name.startswith(root + ".")


class _ImportVisitor(ast.NodeVisitor):
    def __init__(self, info: ModInfo, mods: dict[str, ModInfo], root: str) -> None:
        self.info, self.mods, self.root = info, mods, root
        self.imports: list[Import] = []
        self.depth = 0  # > 0 inside a function body

    def _func(self, node):
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _func

    def _add(self, line, base, target, names=()):
        if _in_root(base, self.root):
            self.imports.append(
                Import(self.info.name, line, base, target, tuple(names), self.depth > 0)
            )

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._add(node.lineno, alias.name, alias.name)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level:
            base = _resolve_relative(self.info, node.level, node.module)
        else:
            base = node.module or ""
        for alias in node.names:
            sub = f"{base}.{alias.name}"
            self._add(node.lineno, base, sub if sub in self.mods else base, (alias.name,))

    def visit_Call(self, node: ast.Call) -> None:
        # importlib.import_module("rag_kernels.x") with a literal name is an import too
        fn = node.func
        name = fn.attr if isinstance(fn, ast.Attribute) else getattr(fn, "id", None)
        if (
            name == "import_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
            and not node.args[0].value.startswith(".")
        ):
            self._add(node.lineno, node.args[0].value, node.args[0].value)
        self.generic_visit(node)


def collect_imports(pkg_dir: Path) -> tuple[dict[str, ModInfo], list[Import]]:
    mods = index_modules(pkg_dir)
    imports: list[Import] = []
    for info in mods.values():
        if info.path.suffix != ".py":
            continue
        tree = ast.parse(info.path.read_text(encoding="utf-8"), filename=str(info.path))
        v = _ImportVisitor(info, mods, pkg_dir.name)
        v.visit(tree)
        imports.extend(v.imports)
    return mods, imports


def private_attribute_uses(info: ModInfo, mods: dict[str, ModInfo]) -> list[tuple[int, str, str]]:
    """``alias._name`` where ``alias`` is bound to a module of the package by an import:
    ``(line, module, name)``."""
    tree = ast.parse(info.path.read_text(encoding="utf-8"))
    aliases: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = _resolve_relative(info, node.level, node.module) if node.level else node.module
            for a in node.names:
                if f"{base}.{a.name}" in mods:
                    aliases[a.asname or a.name] = f"{base}.{a.name}"
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.asname and a.name in mods:
                    aliases[a.asname] = a.name
    out = []
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id in aliases
            and node.attr.startswith("_")
            and not (node.attr.startswith("__") and node.attr.endswith("__"))
        ):
            out.append((node.lineno, aliases[node.value.id], node.attr))
    return out


# Tiers of rag_kernels: a module may import from its own tier or below. The façade
# (rag_kernels/__init__.py) sits between integrations and cotrain; __main__ (the CLI) on top.
TIER_OF_SUBPACKAGE = {"ops": 1, "losses": 2, "integrations": 3, "cotrain": 4}
FACADE_TIER = 3.5
MAIN_TIER = 5
TIER_NAMES = {1: "ops", 2: "losses", 3: "integrations", 3.5: "façade", 4: "cotrain", 5: "__main__"}


def tier(module: str) -> float | None:
    if module == PKG:
        return FACADE_TIER
    if module == f"{PKG}.__main__":
        return MAIN_TIER
    return TIER_OF_SUBPACKAGE.get(module.split(".")[1])


def _fmt(imp: Import) -> str:
    where = " (in a function)" if imp.in_function else ""
    names = f" names={list(imp.names)}" if imp.names else ""
    return f"{imp.importer}:{imp.line} imports {imp.target}{names}{where}"


@pytest.fixture(scope="module")
def package_imports():
    return collect_imports(ROOT / PKG)


def test_every_module_has_a_tier(package_imports):
    mods, _ = package_imports
    untiered = sorted(m for m in mods if tier(m) is None)
    assert not untiered, (
        f"modules outside the tiers {sorted(TIER_OF_SUBPACKAGE)} (place them in a tier, or "
        f"extend TIER_OF_SUBPACKAGE in this test): {untiered}"
    )


def test_package_imports_resolve(package_imports):
    """Every import of a rag_kernels module names a module that exists (no stale paths)."""
    mods, imports = package_imports
    ext = f"{PKG}.ops._C"  # the compiled extension may not be built
    dangling = [_fmt(i) for i in imports if i.target not in mods and i.target != ext]
    assert not dangling, "imports of rag_kernels modules that do not exist:\n" + "\n".join(dangling)


def test_layering(package_imports):
    """ops -> ops; losses -> ops, losses; integrations -> ops, losses, integrations;
    cotrain -> anything; the façade never imports cotrain (function-level imports included)."""
    _, imports = package_imports
    bad = []
    for imp in imports:
        src, dst = tier(imp.importer), tier(imp.target)
        if src is None or dst is None:
            continue  # reported by test_every_module_has_a_tier
        if dst > src:
            bad.append(f"{_fmt(imp)}: tier {TIER_NAMES[src]} may not import tier {TIER_NAMES[dst]}")
    assert not bad, "layering violations (imports must point downward):\n" + "\n".join(bad)


def _unit(info: ModInfo) -> str:
    """The op folder / subpackage a module belongs to (its package)."""
    return _package_of(info)


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def test_no_private_imports_across_subpackages(package_imports):
    """``from <module outside my op folder/subpackage> import _name`` is forbidden (``_C``
    excepted), and so is ``alias._name`` on a module imported from outside it."""
    mods, imports = package_imports
    bad = []
    for imp in imports:
        unit = _unit(mods[imp.importer])
        for name in imp.names:
            if _is_private(name) and name != "_C" and not _in_root(imp.base, unit):
                bad.append(f"{_fmt(imp)}: private name {name!r} from outside {unit}")
    for info in mods.values():
        if info.path.suffix != ".py":
            continue
        unit = _unit(info)
        for line, module, attr in private_attribute_uses(info, mods):
            if attr != "_C" and not _in_root(module, unit):
                bad.append(f"{info.name}:{line} uses {module}.{attr}: private, outside {unit}")
    assert not bad, "private names used across subpackages:\n" + "\n".join(bad)


# ---------------------------------------------------------------------------------------
# import cycles
# ---------------------------------------------------------------------------------------


def import_graph(mods: dict[str, ModInfo], imports: list[Import]) -> dict[str, dict[str, int]]:
    """``graph[a][b] = line``: module a imports module b (function-level imports included)."""
    graph: dict[str, dict[str, int]] = {m: {} for m in mods}
    for imp in imports:
        if imp.target in mods and imp.target != imp.importer:
            graph[imp.importer].setdefault(imp.target, imp.line)
    return graph


def _shortest_cycle(graph: dict[str, dict[str, int]], members: set[str], start: str) -> list[str]:
    prev: dict[str, str] = {start: start}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v]):
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(prev[path[-1]])
                    return [*reversed(path), start]
                if w in members and w not in prev:
                    prev[w] = v
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"{start} is on no cycle")  # cannot happen inside an SCC


def find_cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """Cycles ``[a, b, ..., a]``: for every strongly connected component, the shortest cycle
    through each of its members (deduplicated)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    sccs: list[list[str]] = []
    counter = [0]

    def strongconnect(v: str) -> None:  # Tarjan; the graphs here are small
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                sccs.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            strongconnect(v)

    cycles: list[list[str]] = []
    seen: set[tuple[str, ...]] = set()
    for comp in sccs:  # the shortest cycle through each member of the component (BFS)
        members = set(comp)
        for start in comp:
            cycle = _shortest_cycle(graph, members, start)
            i = cycle.index(min(cycle[:-1]))
            key = tuple(cycle[i:-1] + cycle[:i])  # rotation-invariant
            if key not in seen:
                seen.add(key)
                cycles.append([*key, key[0]])
    return cycles


def _describe_cycle(cycle: list[str], graph: dict[str, dict[str, int]]) -> str:
    hops = [f"{a}:{graph[a][b]} -> {b}" for a, b in zip(cycle, cycle[1:], strict=False)]
    return " ; ".join(hops)


@pytest.mark.parametrize("folder", [PKG, "benchmarks"])
def test_no_import_cycles(folder):
    mods, imports = collect_imports(ROOT / folder)
    graph = import_graph(mods, imports)
    cycles = find_cycles(graph)
    assert not cycles, (
        f"{len(cycles)} import cycle(s) in {folder}/ (module:line -> imported module):\n"
        + "\n".join(_describe_cycle(c, graph) for c in cycles)
    )


def test_cycle_finder_sees_function_level_cycles(tmp_path):
    """The cycle check itself fails on a cycle (here a <-> b through a function-level import)."""
    pkg = tmp_path / "pkgx"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from .sub.b import g\n")
    (pkg / "sub" / "b.py").write_text("from pkgx import a\n")
    (pkg / "c.py").write_text("from . import a\n")
    mods, imports = collect_imports(pkg)
    graph = import_graph(mods, imports)
    assert find_cycles(graph) == [["pkgx.a", "pkgx.sub.b", "pkgx.a"]]
    assert any(i.in_function and i.target == "pkgx.sub.b" for i in imports)


# ---------------------------------------------------------------------------------------
# kernel-only import: nothing but torch
# ---------------------------------------------------------------------------------------

BLOCKED = (
    "transformers", "sentence_transformers", "faiss", "matplotlib", "tqdm", "yaml",
    "tokenizers", "rouge_score", "sacrebleu", "pytrec_eval", "accelerate", "gguf",
    "datasets", "pandas", "scipy", "sklearn",
)  # fmt: skip

KERNEL_ONLY_SCRIPT = textwrap.dedent(
    """
    import importlib.abc, json, sys

    BLOCKED = set(sys.argv[1].split(","))

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.partition(".")[0] in BLOCKED:
                raise ModuleNotFoundError(f"blocked by test_architecture: {name}")
            return None

    sys.meta_path.insert(0, Block())
    report = {}
    import rag_kernels as rk
    report["triton_after_import"] = sorted(
        m for m in sys.modules if m == "triton" or m.startswith("triton.")
    )[:5]

    import torch
    torch.manual_seed(0)
    B, K, T, H, V = 2, 3, 4, 8, 16
    w = torch.randn(V, H, requires_grad=True)
    target = torch.randint(0, V, (B, T))
    target[0, -1] = -100
    scores = torch.randn(B, K, requires_grad=True)
    for mode in ("sequence", "token"):
        h = torch.randn(B, K, T, H, requires_grad=True)
        loss = rk.rag_loss(h, w, target, scores, mode=mode, label_smoothing=0.1)
        loss.backward()
        assert torch.isfinite(loss) and h.grad is not None and torch.isfinite(h.grad).all()
        report[f"rag_loss_{mode}"] = loss.item()
    q = torch.randn(B, H, requires_grad=True)
    d = torch.randn(B + 2, H, requires_grad=True)
    closs = rk.contrastive_loss(q, d)
    closs.backward()
    assert q.grad is not None
    gen = torch.randn(B, K)
    ploss = rk.retriever.pdist_loss(scores, gen)
    ploss.backward()
    h3 = torch.randn(B * K, T, H, requires_grad=True)
    nll = rk.hf.rag_sequence_get_nll(
        h3, w, scores, target.clamp(min=0), pad_token_id=0, reduce_loss=True, epsilon=0.1
    )
    nll.backward()
    out = rk.CoTrainingLoss(retriever_weight=0.5)(nll.detach().requires_grad_(), ploss.detach())
    out.loss.backward()
    report["values"] = [closs.item(), ploss.item(), nll.item(), out.loss.item()]
    report["blocked_loaded"] = sorted(m for m in sys.modules if m.partition(".")[0] in BLOCKED)
    print("REPORT=" + json.dumps(report))
    """
)


def test_kernel_only_import():
    """``import rag_kernels`` and the losses run with none of the app's dependencies, and the
    import alone does not import triton (TRITON_INTERPRET unset)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    proc = subprocess.run(
        [sys.executable, "-c", KERNEL_ONLY_SCRIPT, ",".join(BLOCKED)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, (
        f"kernel-only run failed (rc {proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    )
    line = [x for x in proc.stdout.splitlines() if x.startswith("REPORT=")]
    assert line, f"no report from the subprocess:\n{proc.stdout}\n{proc.stderr}"
    report = json.loads(line[-1][len("REPORT=") :])
    assert report["triton_after_import"] == [], (
        f"`import rag_kernels` imported triton: {report['triton_after_import']}"
    )
    assert report["blocked_loaded"] == [], f"blocked modules got imported: {report}"
    assert all(v == v for v in report["values"]), f"NaN losses: {report}"


# ---------------------------------------------------------------------------------------
# registry contract
# ---------------------------------------------------------------------------------------


def _triton_importable() -> bool:
    if importlib.util.find_spec("triton") is None:
        return False
    try:
        importlib.import_module("triton")
    except Exception:
        return False
    return True


def test_registered_ops_and_folders():
    assert set(registry.ops()) == set(OPS), f"registered ops {registry.ops()} != {OPS}"
    ops_dir = ROOT / PKG / "ops"
    folders = sorted(p.name for p in ops_dir.iterdir() if p.is_dir() and p.name != "__pycache__")
    assert folders == sorted(OPS), f"op folders {folders} != registered ops {sorted(OPS)}"
    for name in folders:
        files = {p.name for p in (ops_dir / name).iterdir() if p.name != "__pycache__"}
        assert files == OP_FILES, (
            f"ops/{name}/ must hold exactly {sorted(OP_FILES)}; extra {sorted(files - OP_FILES)}, "
            f"missing {sorted(OP_FILES - files)}"
        )


@pytest.mark.parametrize("op", OPS)
def test_available_impls_contract(op):
    impls = rk.available_impls(op)
    assert isinstance(impls, tuple), f"available_impls({op!r}) must be a tuple, got {impls!r}"
    assert "reference" in impls, f"{op}: reference missing from {impls}"
    assert ("cpu" in impls) == rk.cpu_available(), (
        f"{op}: cpu in {impls} but cpu_available() is {rk.cpu_available()} "
        f"(reason: {registry.unavailable_reason(op, 'cpu')})"
    )
    if os.environ.get("TRITON_INTERPRET") == "1" and _triton_importable():
        assert "triton" in impls, (
            f"{op}: triton importable under TRITON_INTERPRET=1 but missing from {impls} "
            f"(reason: {registry.unavailable_reason(op, 'triton')})"
        )
    assert set(impls) <= set(registry.KERNEL_IMPLS)


def test_unknown_op_raises():
    with pytest.raises(ValueError, match="unknown op"):
        rk.available_impls("no_such_op")
    with pytest.raises(ValueError, match="unknown op"):
        registry.resolve("no_such_op", "auto", torch.zeros(1))


# ---------------------------------------------------------------------------------------
# no silent slow path
# ---------------------------------------------------------------------------------------


@pytest.fixture
def clean_registry(monkeypatch):
    """Snapshot the registry's per-op caches and restore them afterwards."""
    saved = {n: (dict(op.modules), dict(op.errors)) for n, op in registry._OPS.items()}
    monkeypatch.setattr(registry, "_warned_fallback", registry._warned_fallback)
    yield registry
    for n, (mods, errs) in saved.items():
        registry._OPS[n].modules.clear()
        registry._OPS[n].modules.update(mods)
        registry._OPS[n].errors.clear()
        registry._OPS[n].errors.update(errs)


def test_cuda_without_triton_raises(clean_registry, monkeypatch):
    name = "rag_kernels.ops.linear_logprob.triton"
    op = registry._OPS["linear_logprob"]
    op.modules.pop("triton", None)
    op.errors.pop("triton", None)
    monkeypatch.setitem(sys.modules, name, None)  # import now raises ModuleNotFoundError
    with pytest.raises(ImportError) as import_error:
        importlib.import_module(name)
    fake_ref = types.SimpleNamespace(is_cuda=True, device=torch.device("cuda", 0))
    with pytest.raises(RuntimeError) as exc:
        registry.resolve("linear_logprob", "auto", fake_ref)
    msg = str(exc.value)
    assert str(import_error.value) in msg, f"import error text missing from: {msg}"
    assert "impl='reference'" in msg, f"the way out (impl='reference') missing from: {msg}"
    # Explicit reference stays possible.
    assert registry.resolve("linear_logprob", "reference", fake_ref) == "reference"


def test_cpu_without_extension_warns_once(clean_registry, monkeypatch):
    monkeypatch.setattr(registry, "_C", None)
    monkeypatch.setattr(registry, "_warned_fallback", False)
    for op in registry._OPS.values():
        op.modules.pop("cpu", None)
        op.errors.pop("cpu", None)
    h = torch.randn(3, 8)
    w = torch.randn(5, 8)
    y = torch.tensor([0, 4, 2])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert registry.resolve("linear_logprob", "auto", h) == "reference"
        assert registry.resolve("linear_logprob", "auto", h) == "reference"
        out = rk.linear_logprob(h, w, y)  # the public path falls back silently from now on
        ref = rk.linear_logprob(h, w, y, impl="reference")
    runtime = [c for c in caught if issubclass(c.category, RuntimeWarning)]
    assert len(runtime) == 1, (
        f"expected one RuntimeWarning, got {[str(c.message) for c in runtime]}"
    )
    assert "reference" in str(runtime[0].message)
    torch.testing.assert_close(out, ref)
    assert not rk.cpu_available()
    assert "cpu" not in rk.available_impls("linear_logprob")
    with pytest.raises(RuntimeError, match="C\\+\\+ extension"):
        registry.resolve("linear_logprob", "cpu", h)


# ---------------------------------------------------------------------------------------
# validate once, one host synchronisation
# ---------------------------------------------------------------------------------------

SYNC_METHODS = ("item", "tolist", "__bool__", "__int__", "__float__")


class SyncCounter:
    """Counts host synchronisations: ``validation.host_read`` calls plus Tensor.item / tolist /
    __bool__ / __int__ / __float__ calls made outside ``host_read`` (its own ``tolist`` is the
    sync it stands for)."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str]] = []
        self.depth = 0
        self.active = False

    def wrap(self, label, fn):
        def wrapper(*args, **kwargs):
            if self.active and self.depth == 0:
                self.events.append((label, _caller()))
            self.depth += 1
            try:
                return fn(*args, **kwargs)
            finally:
                self.depth -= 1

        return wrapper


def _caller() -> str:
    pkg = str(ROOT / PKG)
    frames = [f for f in traceback.extract_stack()[:-2] if f.filename.startswith(pkg)]
    if not frames:
        return "outside rag_kernels"
    f = frames[-1]
    return f"{Path(f.filename).relative_to(ROOT)}:{f.lineno} ({f.name})"


@pytest.fixture
def sync_counter(monkeypatch):
    c = SyncCounter()
    monkeypatch.setattr(V, "host_read", c.wrap("host_read", V.host_read))
    for m in SYNC_METHODS:
        monkeypatch.setattr(torch.Tensor, m, c.wrap(f"Tensor.{m}", getattr(torch.Tensor, m)))
    saved = V._value_checks
    yield c
    V.set_value_checks(saved)


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    B, K, T, H, Vv = 2, 3, 4, 8, 16
    target = torch.randint(1, Vv, (B, T), generator=g)
    target[0, -1] = -100
    hf_target = target.clamp(min=0)  # pad 0 for the hf drop-ins
    hf_target[:, 0] = 1  # a BOS everywhere
    doc_mask = torch.ones(B, K, dtype=torch.bool)
    doc_mask[1, 2] = False
    pos_mask = torch.zeros(B + 1, B + 4, dtype=torch.bool)
    pos_mask[torch.arange(B + 1), torch.arange(B + 1)] = True
    pos_mask[0, B + 2] = True  # query 0 has two positives
    return types.SimpleNamespace(
        B=B, K=K, T=T, H=H, V=Vv,
        hidden=torch.randn(B, K, T, H, generator=g),
        rows=torch.randn(B * T, H, generator=g),
        hidden_hf=torch.randn(B * K, T, H, generator=g),
        weight=torch.randn(Vv, H, generator=g) * 0.5,
        bias=torch.randn(Vv, generator=g) * 0.1,
        target=target,
        row_target=target.reshape(-1),
        hf_target=hf_target,
        scores=torch.randn(B, K, generator=g),
        doc_mask=doc_mask,
        token_mask=target != -100,
        token_lp=-torch.rand(B, K, T, generator=g) * 3,
        queries=torch.randn(B + 1, H, generator=g),
        docs=torch.randn(B + 4, H, generator=g),
        pos_index=torch.tensor([0, 2, 1]),
        pos_mask=pos_mask,
    )  # fmt: skip


def _sync_cases():
    cases = {
        "linear_logprob": lambda x, impl: rk.linear_logprob(
            x.rows, x.weight, x.row_target, bias=x.bias, impl=impl
        ),
        "rag_sequence_loss": lambda x, impl: rk.rag_sequence_loss(
            x.token_lp, x.scores, token_mask=x.token_mask, doc_mask=x.doc_mask, impl=impl
        ),
        "rag_token_loss": lambda x, impl: rk.rag_token_loss(
            x.token_lp, x.scores, token_mask=x.token_mask, doc_mask=x.doc_mask, impl=impl
        ),
        "generator_feedback": lambda x, impl: rk.generator_feedback(
            x.hidden, x.weight, x.target, bias=x.bias, impl=impl
        ),
        "contrastive_index": lambda x, impl: rk.contrastive_loss(
            x.queries, x.docs, x.pos_index, impl=impl
        ),
        "contrastive_mask": lambda x, impl: rk.contrastive_loss(
            x.queries, x.docs, x.pos_mask, impl=impl
        ),
        "token_smoothing": lambda x, impl: rk.ops.token_smoothing.token_smoothing(
            x.hidden, x.weight, x.scores, bias=x.bias, doc_mask=x.doc_mask, impl=impl
        ),
    }
    for mode in ("sequence", "token"):
        for eps in (0.0, 0.1):
            cases[f"rag_loss_{mode}_ls{eps}"] = (
                lambda x, impl, mode=mode, eps=eps: rk.rag_loss(
                    x.hidden, x.weight, x.target, x.scores, mode=mode, bias=x.bias,
                    label_smoothing=eps, doc_mask=x.doc_mask, impl=impl,
                )
            )  # fmt: skip
    for eps in (0.0, 0.1):
        cases[f"hf_rag_sequence_get_nll_eps{eps}"] = (
            lambda x, impl, eps=eps: rk.hf.rag_sequence_get_nll(
                x.hidden_hf, x.weight, x.scores, x.hf_target, pad_token_id=0, bos_token_id=1,
                exclude_bos_score=True, epsilon=eps, bias=x.bias, impl=impl,
            )
        )  # fmt: skip
        cases[f"hf_rag_token_get_nll_eps{eps}"] = (
            lambda x, impl, eps=eps: rk.hf.rag_token_get_nll(
                x.hidden_hf, x.weight, x.scores, x.hf_target, pad_token_id=0, epsilon=eps,
                bias=x.bias, impl=impl,
            )
        )  # fmt: skip
    params = [
        pytest.param(
            lambda x, impl: rk.document_posterior(
                x.token_lp, x.scores, token_mask=x.token_mask, doc_mask=x.doc_mask, mode="token"
            ),
            "reference",
            id="document_posterior",
        )
    ]
    no_cpu = pytest.mark.skipif(not rk.cpu_available(), reason="C++ extension not built")
    for name, fn in cases.items():
        for impl in ("reference", "cpu"):
            marks = [no_cpu] if impl == "cpu" else []
            params.append(pytest.param(fn, impl, id=f"{name}-{impl}", marks=marks))
    return params


@pytest.mark.parametrize(("call", "impl"), _sync_cases())
def test_one_host_sync(sync_counter, call, impl):
    x = _inputs()
    call(x, impl)  # warm-up: lazy kernel-module imports happen once per process
    sync_counter.active = True
    call(x, impl)
    sync_counter.active = False
    events = list(sync_counter.events)
    assert len(events) <= 1, f"{len(events)} host syncs in one forward (at most 1): {events}"

    sync_counter.events.clear()
    V.set_value_checks(False)
    sync_counter.active = True
    call(x, impl)
    sync_counter.active = False
    assert sync_counter.events == [], (
        f"host syncs with set_value_checks(False): {sync_counter.events}"
    )


def test_sync_counter_sees_syncs(sync_counter):
    """The counter itself works: every kind of host read it watches is seen, once."""
    t = torch.ones(())
    sync_counter.active = True
    bool(t), t.item(), float(t), int(t), t.tolist()
    V.host_read(torch.zeros(2, dtype=torch.bool))
    sync_counter.active = False
    kinds = [e[0] for e in sync_counter.events]
    assert kinds == [
        "Tensor.__bool__", "Tensor.item", "Tensor.__float__", "Tensor.__int__",
        "Tensor.tolist", "host_read",
    ], kinds  # fmt: skip


def test_value_checks_still_catch_bad_input(sync_counter):
    """The single read is the one that validates: a bad target raises, naming the argument."""
    x = _inputs()
    bad = x.target.clone()
    bad[1, 1] = x.V + 3
    sync_counter.active = True
    with pytest.raises(ValueError, match="target"):
        rk.rag_loss(x.hidden, x.weight, bad, x.scores)
    sync_counter.active = False
    assert [e[0] for e in sync_counter.events][:1] == ["host_read"], sync_counter.events


# ---------------------------------------------------------------------------------------
# autocast
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AutocastCase:
    name: str
    call: object  # (tensors: dict, impl) -> output
    low: tuple[str, ...]  # matmul operands given in bf16
    high: tuple[str, ...]  # matmul operands given in fp32 (mismatched)
    mismatch_name: str  # the argument a dtype mismatch names outside autocast


def _ac_tensors():
    x = _inputs(1)
    return {
        "hidden4": x.hidden,
        "hidden3": x.hidden_hf,
        "rows": x.rows,
        "weight": x.weight,
        "bias": x.bias,
        "scores": x.scores,
        "queries": x.queries,
        "docs": x.docs,
        "_target": x.target,
        "_row_target": x.row_target,
        "_hf_target": x.hf_target,
        "_doc_mask": x.doc_mask,
        "_pos_index": x.pos_index,
    }


def _autocast_cases(known_bugs: dict[str, str] | None = None):
    cases = [
        AutocastCase(
            "linear_logprob",
            lambda t, impl: rk.linear_logprob(
                t["rows"], t["weight"], t["_row_target"], bias=t["bias"], impl=impl
            ),
            ("rows",),
            ("weight", "bias"),
            "weight",
        ),
        AutocastCase(
            "contrastive",
            lambda t, impl: rk.contrastive_loss(
                t["queries"], t["docs"], t["_pos_index"], impl=impl
            ),
            ("queries",),
            ("docs",),
            "docs",
        ),
    ]
    for mode in ("sequence", "token"):
        for eps in (0.0, 0.1):
            cases.append(
                AutocastCase(
                    f"rag_loss_{mode}_ls{eps}",
                    lambda t, impl, mode=mode, eps=eps: rk.rag_loss(
                        t["hidden4"], t["weight"], t["_target"], t["scores"], mode=mode,
                        bias=t["bias"], label_smoothing=eps, doc_mask=t["_doc_mask"], impl=impl,
                    ),
                    ("hidden4",),
                    ("weight", "bias"),
                    "weight",
                )
            )  # fmt: skip
    for eps in (0.0, 0.1):
        cases.append(
            AutocastCase(
                f"hf_rag_sequence_get_nll_eps{eps}",
                lambda t, impl, eps=eps: rk.hf.rag_sequence_get_nll(
                    t["hidden3"], t["weight"], t["scores"], t["_hf_target"], pad_token_id=0,
                    bos_token_id=1, exclude_bos_score=True, epsilon=eps, bias=t["bias"],
                    impl=impl,
                ),
                ("hidden3",),
                ("weight", "bias"),
                "weight",
            )
        )  # fmt: skip
        cases.append(
            AutocastCase(
                f"hf_rag_token_get_nll_eps{eps}",
                lambda t, impl, eps=eps: rk.hf.rag_token_get_nll(
                    t["hidden3"], t["weight"], t["scores"], t["_hf_target"], pad_token_id=0,
                    epsilon=eps, bias=t["bias"], impl=impl,
                ),
                ("hidden3",),
                ("weight", "bias"),
                "weight",
            )
        )  # fmt: skip
    no_cpu = pytest.mark.skipif(not rk.cpu_available(), reason="C++ extension not built")
    known_bugs = known_bugs or {}
    params = []
    for c in cases:
        for impl in ("reference", "cpu"):
            pid = f"{c.name}-{impl}"
            marks = [no_cpu] if impl == "cpu" else []
            if pid in known_bugs:
                marks.append(pytest.mark.xfail(strict=True, reason=known_bugs[pid]))
            params.append(pytest.param(c, impl, id=pid, marks=marks))
    return params


# Package bugs found by these tests (strict xfail: they turn red once fixed, drop the entry).
AUTOCAST_BUGS: dict[str, str] = {}  # case-impl -> reason (xfail, strict)


@pytest.mark.parametrize(("case", "impl"), _autocast_cases(AUTOCAST_BUGS))
def test_autocast_mixed_dtypes(case, impl):
    base = _ac_tensors()
    t = dict(base)
    for n in case.low:
        t[n] = base[n].to(torch.bfloat16).requires_grad_()
    for n in case.high:
        t[n] = base[n].clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = case.call(t, impl)
    assert out.dtype == torch.float32, f"{case.name}/{impl}: output {out.dtype}, expected fp32"

    # fp32 computation on the bf16-rounded matmul operands, outside autocast
    r = dict(base)
    for n in (*case.low, *case.high):
        r[n] = base[n].to(torch.bfloat16).float()
    expected = case.call(r, "reference")
    torch.testing.assert_close(
        out.detach(), expected, rtol=2e-2, atol=2e-3, msg=lambda m: f"{case.name}/{impl}: {m}"
    )

    out.sum().backward()
    for n in case.low:
        g = t[n].grad
        assert g is not None and g.dtype == torch.bfloat16, (
            f"{case.name}/{impl}: {n}.grad {None if g is None else g.dtype}, expected bf16"
        )
    for n in case.high:
        g = t[n].grad
        assert g is not None and g.dtype == torch.float32, (
            f"{case.name}/{impl}: {n}.grad {None if g is None else g.dtype}, expected fp32"
        )
        assert torch.isfinite(g).all(), f"{case.name}/{impl}: non-finite {n}.grad"


@pytest.mark.parametrize(("case", "impl"), _autocast_cases())
def test_mixed_dtypes_outside_autocast_raise(case, impl):
    base = _ac_tensors()
    t = dict(base)
    for n in case.low:
        t[n] = base[n].to(torch.bfloat16)
    with pytest.raises(TypeError, match=case.mismatch_name):
        case.call(t, impl)


@pytest.mark.parametrize(("case", "impl"), _autocast_cases())
def test_autocast_keeps_float64(case, impl):
    base = _ac_tensors()
    t = {n: (v.double() if v.is_floating_point() else v) for n, v in base.items()}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = case.call(t, impl)
    assert out.dtype == torch.float64, f"{case.name}/{impl}: fp64 inputs gave {out.dtype}"
    expected = case.call(t, "reference")
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)


# --------------------------------------------------------------- references stay inside

_PATH_RE = re.compile(
    r"(?<![\w./-])((?:rag_kernels|csrc|tests|benchmarks|docs|examples)/[\w./-]*[\w/])"
)


def _tracked_text_files() -> list[Path]:
    out = subprocess.run(
        ["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=False
    ).stdout.split()
    exts = {".py", ".md", ".sh", ".toml", ".cpp", ".h", ".txt", ".cfg"}
    return [ROOT / p for p in out if Path(p).suffix in exts or Path(p).name == "Makefile"]


# spelled in pieces so that this file does not itself name them
_OUTSIDE_REFS = ("DESIGN" + ".md", "../" + "shared")


def test_no_reference_outside_the_repository():
    """Docs and comments cite files of the repository only (no team notes kept outside it),
    and every repository path named in the docs exists."""
    files = _tracked_text_files()
    if not files:
        pytest.skip("not a git checkout")
    bad = []
    for f in files:
        if f == Path(__file__).resolve():
            continue
        text = f.read_text(encoding="utf-8", errors="replace")
        for lineno, line in enumerate(text.splitlines(), 1):
            if any(ref in line for ref in _OUTSIDE_REFS):
                bad.append(f"{f.relative_to(ROOT)}:{lineno}: {line.strip()[:100]}")
            if f.suffix == ".md":
                for m in _PATH_RE.finditer(line):
                    path = m.group(1).rstrip("/.")
                    templated = line[m.end() : m.end() + 1] in ("<", "*", "{")
                    if not templated and not (ROOT / path).exists():
                        bad.append(f"{f.relative_to(ROOT)}:{lineno}: missing {path}")
    assert not bad, "references outside the repository or to missing files:\n" + "\n".join(bad)
