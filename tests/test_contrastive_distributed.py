"""contrastive_loss(gather=True) across 2 gloo processes vs one process on the concatenated
batch; all_gather_with_grad; GradCache (rag_kernels.losses.distributed.grad_cache_step)."""

import os
import socket
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from rag_kernels.losses.distributed import all_gather_with_grad, grad_cache_step
from rag_kernels.ops.contrastive import contrastive_loss
from rag_kernels.ops.registry import available_impls

WORLD = 2
IMPL = "cpu" if "cpu" in available_impls("contrastive") else "reference"
D = 5
# per rank: queries, positive docs (== queries), hard negatives (differs across ranks)
B_LOCAL = 3
N_HARD = [2, 4]

CASES = {
    "cos_hardneg": dict(),
    "dot_symmetric_ids": dict(similarity="dot", scale=0.5, symmetric=True, doc_ids=True),
    "multi_pos_ids": dict(mask=True, doc_ids=True),
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _data(rank: int):
    g = torch.Generator().manual_seed(100 + rank)
    q = torch.randn(B_LOCAL, D, dtype=torch.float64, generator=g)
    docs = torch.randn(B_LOCAL + N_HARD[rank], D, dtype=torch.float64, generator=g)
    # ids: positives of rank 0 and rank 1 share id 1 across ranks (a cross-rank false negative)
    ids = torch.arange(docs.shape[0]) + 100 * rank
    ids[1] = 1
    mask = torch.zeros(B_LOCAL, docs.shape[0], dtype=torch.bool)
    mask[torch.arange(B_LOCAL), torch.arange(B_LOCAL)] = True
    mask[0, -1] = True  # query 0 also accepts the last hard negative
    return q, docs, ids, mask


def _kwargs(case, ids, mask):
    kw = dict(CASES[case])
    use_mask = kw.pop("mask", False)
    if kw.pop("doc_ids", False):
        kw["doc_ids"] = ids
    return kw, (mask if use_mask else None)


def _worker(rank, port, out_dir):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        results = {}
        for case in CASES:
            q, docs, ids, mask = _data(rank)
            q.requires_grad_(True)
            docs.requires_grad_(True)
            kw, positives = _kwargs(case, ids, mask)
            loss = contrastive_loss(q, docs, positives, gather=True, impl=IMPL, **kw)
            loss.backward()
            results[case] = (loss.detach(), q.grad / WORLD, docs.grad / WORLD)
        # all_gather_with_grad alone: y = gather(x); L_r = sum(c_r * y); dx = sum_r c_r[slice]
        x = torch.full((rank + 1, 2), float(rank), requires_grad=True)  # unequal rows per rank
        y = all_gather_with_grad(x)
        (y * (rank + 1)).sum().backward()
        results["gather"] = (y.detach(), x.grad)
        # ranks that disagree (D, dtype, doc_ids, kind of positives): gloo aborted one rank on
        # a size mismatch and the other computed a loss from uninitialised rows
        q, docs, ids, mask = _data(rank)
        last = rank == WORLD - 1
        bad = {
            "dim": lambda: contrastive_loss(
                q[:, : D - last], docs[:, : D - last], gather=True, impl=IMPL
            ),
            "dtype": lambda: contrastive_loss(
                q.float() if last else q, docs.float() if last else docs, gather=True, impl=IMPL
            ),
            "doc_ids": lambda: contrastive_loss(
                q, docs, gather=True, doc_ids=None if last else ids, impl=IMPL
            ),
        }
        errors = {}
        for name, fn in bad.items():
            try:
                fn()
                errors[name] = None
            except ValueError as e:
                errors[name] = str(e)
        results["errors"] = errors
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def rank_results():
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(_free_port(), tmp), nprocs=WORLD, join=True)
        return [torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in range(WORLD)]


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_gather_matches_single_process(rank_results, case):
    """mean of local losses == global loss; DDP-averaged grads (local / world, the ranks'
    pieces concatenated) == the single-process gradient on the concatenated batch."""
    data = [_data(r) for r in range(WORLD)]
    q = torch.cat([d[0] for d in data]).requires_grad_(True)
    docs = torch.cat([d[1] for d in data]).requires_grad_(True)
    ids = torch.cat([d[2] for d in data])
    offsets = [0, data[0][1].shape[0]]
    pos = torch.cat([torch.arange(B_LOCAL) + offsets[r] for r in range(WORLD)])
    mask = torch.zeros(WORLD * B_LOCAL, docs.shape[0], dtype=torch.bool)
    for r in range(WORLD):
        mask[r * B_LOCAL : (r + 1) * B_LOCAL, offsets[r] : offsets[r] + data[r][1].shape[0]] = data[
            r
        ][3]
    kw, use_mask = _kwargs(case, ids, mask)
    loss = contrastive_loss(q, docs, mask if use_mask is not None else pos, impl="reference", **kw)
    loss.backward()
    local_losses = torch.stack([rank_results[r][case][0] for r in range(WORLD)])
    torch.testing.assert_close(local_losses.mean(), loss)
    torch.testing.assert_close(torch.cat([rank_results[r][case][1] for r in range(WORLD)]), q.grad)
    torch.testing.assert_close(
        torch.cat([rank_results[r][case][2] for r in range(WORLD)]), docs.grad
    )


def test_all_gather_with_grad_unequal_sizes(rank_results):
    y0, gx0 = rank_results[0]["gather"]
    y1, gx1 = rank_results[1]["gather"]
    expected = torch.tensor([[0.0, 0.0], [1.0, 1.0], [1.0, 1.0]])
    torch.testing.assert_close(y0, expected)
    torch.testing.assert_close(y1, expected)
    # each rank's loss weights the gathered tensor by (rank + 1): the sum over ranks is 3
    torch.testing.assert_close(gx0, torch.full((1, 2), 3.0))
    torch.testing.assert_close(gx1, torch.full((2, 2), 3.0))


def test_gather_without_process_group_is_identity():
    q, docs = torch.randn(4, 3), torch.randn(6, 3)
    torch.testing.assert_close(
        contrastive_loss(q, docs, gather=True, impl="reference"),
        contrastive_loss(q, docs, impl="reference"),
    )


# ------------------------------------------------------------------ GradCache


class _Encoder(torch.nn.Module):
    def __init__(self, dropout=0.0):
        super().__init__()
        self.lin = torch.nn.Linear(7, 6, dtype=torch.float64)
        self.drop = torch.nn.Dropout(dropout)

    def forward(self, x):
        return self.drop(torch.tanh(self.lin(x)))


def _params(*mods):
    return [p for m in mods for p in m.parameters()]


@pytest.mark.parametrize("chunk", [1, 3, 4], ids=lambda c: f"chunk{c}")
def test_grad_cache_equals_full_batch(chunk):
    torch.manual_seed(0)
    qenc, denc = _Encoder(), _Encoder()
    xq, xd = torch.randn(10, 7, dtype=torch.float64), torch.randn(17, 7, dtype=torch.float64)
    log_scale = torch.tensor(3.0, dtype=torch.float64, requires_grad=True)
    loss_fn = lambda q, d: contrastive_loss(q, d, scale=log_scale.exp(), symmetric=True, impl=IMPL)

    full = loss_fn(qenc(xq), denc(xd))
    full.backward()
    expected = [p.grad.clone() for p in _params(qenc, denc)] + [log_scale.grad.clone()]
    for p in [*_params(qenc, denc), log_scale]:
        p.grad = None

    cached = grad_cache_step(qenc, denc, xq, xd, loss_fn, chunk_size=chunk)
    got = [p.grad for p in _params(qenc, denc)] + [log_scale.grad]
    torch.testing.assert_close(cached, full.detach())
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b)


def test_grad_cache_replays_dropout_and_dict_inputs():
    """With dropout the re-encoding must reuse each chunk's RNG state: the gradient equals
    the one of a graph-keeping chunked encoding under the same seed."""
    qenc, denc = _Encoder(0.3), _Encoder(0.3)
    xq, xd = torch.randn(8, 7, dtype=torch.float64), torch.randn(9, 7, dtype=torch.float64)
    loss_fn = lambda q, d: contrastive_loss(q, d, impl="reference")
    enc_q = lambda b: qenc(b["x"])

    torch.manual_seed(5)
    q = torch.cat([enc_q({"x": c}) for c in xq.split(3)])
    d = torch.cat([denc(c) for c in xd.split(3)])
    ref = loss_fn(q, d)
    ref.backward()
    expected = [p.grad.clone() for p in _params(qenc, denc)]
    for p in _params(qenc, denc):
        p.grad = None

    torch.manual_seed(5)
    got_loss = grad_cache_step(enc_q, denc, {"x": xq}, xd, loss_fn, chunk_size=3)
    torch.testing.assert_close(got_loss, ref.detach())
    for a, b in zip([p.grad for p in _params(qenc, denc)], expected, strict=True):
        torch.testing.assert_close(a, b)


def test_grad_cache_bad_chunk_size():
    with pytest.raises(ValueError, match="chunk_size"):
        grad_cache_step(
            lambda x: x,
            lambda x: x,
            torch.randn(2, 2),
            torch.randn(2, 2),
            lambda q, d: (q * d).sum(),
            chunk_size=0,
        )


@pytest.mark.parametrize(
    "name, text",
    [
        ("dim", "same embedding dim D of docs, got rank 0: 5, rank 1: 4"),
        ("dtype", "same dtype of queries / docs, got rank 0: torch.float64, rank 1: torch.float32"),
        ("doc_ids", "same doc_ids (1: given), got rank 0: 1, rank 1: 0"),
    ],
)
def test_ranks_that_disagree_raise_on_every_rank(rank_results, name, text):
    for rank, res in enumerate(rank_results):
        err = res["errors"][name]
        assert err is not None and text in err, f"rank {rank}: {err}"
