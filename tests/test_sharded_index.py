"""The sharded dense index (rag_kernels.cotrain.retrieval.ShardedIndex) on 2 and 3 gloo
processes against one DenseIndex over the whole corpus: the same indices and the same scores,
bit for bit, with duplicate passages (ties, also across shards and at the k-th place), uneven
shards (23 passages), uneven query batches, k larger than a shard, empty shards; the refresh
embeds only the local rows; errors are raised on every rank. Then the training loop on 2
ranks: the sharded index retrieves what one process retrieves, trains like the replicated
index (--index-shards 1), refreshes its shard only, and ``fit`` runs to the end."""

import dataclasses
import json
import os
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from rag_kernels.cotrain.retrieval import DenseIndex, ShardedIndex, shard_range
from toolkit import tiny_dataset, tiny_train_config

pytest.importorskip("faiss")

N, D = 23, 8  # 23 passages: 12 + 11 on 2 ranks, 7 + 8 + 8 on 3
DUPLICATES = {5: 0, 12: 0, 20: 0, 9: 2, 17: 2, 22: 11}  # row -> the row it copies
KS = [1, 2, 4, 5, 9, N]  # k = 2 cuts the tie group {0, 5, 12, 20}; 9 > a shard of 3 ranks


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _corpus(n: int = N) -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    x = torch.nn.functional.normalize(torch.randn(n, D, generator=g), dim=-1)
    for row, source in DUPLICATES.items():
        if row < n:
            x[row] = x[source]
    return x


def _queries(rank: int) -> torch.Tensor:
    """2 + rank queries (uneven batches): a copy of passage 0 (tied with 5, 12, 20), of
    passage 2 (tied with 9, 17), then random ones."""
    g = torch.Generator().manual_seed(100 + rank)
    q = torch.nn.functional.normalize(torch.randn(2 + rank, D, generator=g), dim=-1)
    q[0], q[1] = _corpus()[0], _corpus()[2]
    return q


def _error(fn) -> str:
    try:
        fn()
    except ValueError as e:
        return str(e)
    return "no error"


def _index_worker(rank, world, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        corpus, q = _corpus(), _queries(rank)
        res = {}
        flat = ShardedIndex(N, "flat")
        res["shard"] = (flat.start, flat.stop)
        flat.build(corpus[flat.start : flat.stop])
        res["flat"] = {k: flat.search(q, k) for k in KS}
        res["with_embeddings"] = flat.search_with_embeddings(q, 5)
        ids = torch.tensor([[rank, N - 1 - rank, 5], [5, 0, 22]])  # other shards' rows too
        res["rows"] = (ids, flat.rows(ids))
        res["rows_1d"] = flat.rows(torch.arange(rank + 1))  # uneven request sizes
        # IVF over each shard: nprobe = nlist searches every cell (= flat); nprobe < nlist
        ivf = ShardedIndex(N, "ivf", nlist=2, nprobe=2)
        ivf.build(corpus[ivf.start : ivf.stop])
        res["ivf_all"] = {k: ivf.search(q, k) for k in KS}
        few = ShardedIndex(N, "ivf", nlist=3, nprobe=1)
        few.build(corpus[few.start : few.stop])
        res["ivf_few"] = few.search(q, 6)
        # refresh: the encoder sees this rank's texts only
        seen = []

        def encode(texts):
            seen.append(list(texts))
            return corpus[[int(t[1:]) for t in texts]]

        fresh = ShardedIndex(N, "flat").refresh([f"t{j}" for j in range(N)], encode, dim=D)
        res["refresh_texts"] = seen
        res["refresh"] = fresh.search(q, 4)
        # checkpoint states: a sharded state holds no embeddings; a whole one is sliced
        res["state_embeddings"] = flat.state_dict()["embeddings"]
        restored = ShardedIndex(N, "flat")
        restored.load_state_dict(DenseIndex("flat").build(corpus).state_dict())
        res["restored"] = restored.search(q, 4)
        # fewer passages than ranks: an empty shard still takes part
        tiny = ShardedIndex(2, "flat")
        tiny.build(_corpus(2)[tiny.start : tiny.stop])
        res["tiny_shard"] = (tiny.start, tiny.stop)
        res["tiny"] = tiny.search(q, 2)
        res["tiny_emb"] = tiny.search_with_embeddings(q, 2)[2]
        # errors: the same on every rank (no rank left waiting in a collective)
        res["err_k_corpus"] = _error(lambda: flat.search(q, N + 1))
        res["err_k_differs"] = _error(lambda: flat.search(q, 2 + rank))
        bad = q.clone()
        if rank == 1:
            bad[0, 0] = float("nan")
        res["err_nan"] = _error(lambda: flat.search(bad, 2))
        res["after_errors"] = flat.search(q, 3)  # the group still works
        torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _spawn(worker, world: int, out: str) -> list:
    mp.start_processes(worker, args=(world, _free_port(), out), nprocs=world, start_method="spawn")
    return [torch.load(os.path.join(out, f"rank{r}.pt"), weights_only=False) for r in range(world)]


@pytest.fixture(scope="module", params=[2, 3], ids=["2ranks", "3ranks"])
def ranks(request, tmp_path_factory):
    world = request.param
    return world, _spawn(_index_worker, world, str(tmp_path_factory.mktemp(f"index{world}")))


def _single(k, rank):
    return DenseIndex("flat").build(_corpus()).search(_queries(rank), k)


def _equal(got, want):
    for a, b in zip(got, want, strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b), (a, b)


# ------------------------------------------------------------------ the index alone
def test_shards_cover_the_corpus_unevenly(ranks):
    world, res = ranks
    bounds = [r["shard"] for r in res]
    assert bounds[0][0] == 0 and bounds[-1][1] == N
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:], strict=False))
    sizes = [b - a for a, b in bounds]
    assert max(sizes) - min(sizes) == 1  # 23 is not divisible by 2 or 3


def test_flat_top_k_equals_the_single_index_exactly(ranks):
    """Ids and scores bit for bit, k = 1 .. N, every rank's own (uneven) batch."""
    world, res = ranks
    for rank in range(world):
        for k in KS:
            _equal(res[rank]["flat"][k], _single(k, rank))


def test_ties_are_broken_by_the_lower_passage_index(ranks):
    """A copy of passage 0 ties with its duplicates 5, 12, 20 (on different shards): they
    come in corpus order, and k = 2 keeps the two lowest."""
    world, res = ranks
    for rank in range(world):
        s, i = res[rank]["flat"][N]
        assert i[0, :4].tolist() == [0, 5, 12, 20] and i[1, :3].tolist() == [2, 9, 17]
        assert torch.equal(s[0, :4], s[0, :1].expand(4))
        assert res[rank]["flat"][2][1][0].tolist() == [0, 5]
        assert res[rank]["flat"][1][1][:, 0].tolist()[:2] == [0, 2]


def test_single_index_follows_the_definition():
    """The order "higher score, then lower index" against a float64 oracle over all rows."""
    corpus = _corpus()
    for rank in range(3):
        q = _queries(rank)
        s, i = DenseIndex("flat").build(corpus).search(q, N)
        exact = (q.double() @ corpus.double().T).float()
        for b in range(len(q)):
            order = sorted(range(N), key=lambda j: (-float(exact[b, j]), j))
            assert i[b].tolist() == order
        torch.testing.assert_close(s, exact.gather(1, i), rtol=0, atol=1e-6)


def test_k_larger_than_a_shard_and_the_whole_corpus(ranks):
    world, res = ranks
    for rank in range(world):
        s, i = res[rank]["flat"][N]  # every shard is smaller than N: all passages, once
        assert sorted(i[0].tolist()) == list(range(N)) and bool(torch.isfinite(s).all())
        assert (
            res[rank]["err_k_corpus"]
            == f"k={N + 1} exceeds the number of passages in the index ({N})"
        )
    with pytest.raises(ValueError, match=f"k={N + 1} exceeds the number of passages"):
        DenseIndex("flat").build(_corpus()).search(_queries(0), N + 1)
    with pytest.raises(ValueError, match="k must be an int >= 1"):
        DenseIndex("flat").build(_corpus()).search(_queries(0), 0)


def test_float64_queries_beyond_float32_are_refused():
    """The index searches in float32: a float64 query that overflows there was searched as
    inf and came back as ids -1 and scores -inf instead of an error."""
    index = DenseIndex("flat").build(_corpus())
    q = _queries(0).double()
    q[0, 0] = 1e39
    with pytest.raises(ValueError, match="beyond float32's range"):
        index.search(q, 2)


@pytest.mark.parametrize(
    "kw,msg",
    [
        (dict(nlist=0), "nlist must be an int >= 1, got 0"),
        (dict(nlist=-3), "nlist must be an int >= 1"),
        (dict(nlist=2.5), "nlist must be an int >= 1, got 2.5"),
        (dict(nlist=True), "nlist must be an int >= 1"),
        (dict(nprobe=-1), "nprobe must be an int >= 0, got -1"),
    ],
    ids=["nlist0", "nlist_neg", "nlist_float", "nlist_bool", "nprobe_neg"],
)
def test_ivf_parameters_are_checked(kw, msg):
    """They failed deep inside faiss (a RuntimeError at search, SWIG type errors)."""
    with pytest.raises(ValueError, match=msg):
        DenseIndex("ivf", **kw)


def test_rows_refuses_a_bool_tensor():
    """A bool mask was read as the row ids 0 and 1."""
    with pytest.raises(ValueError, match="ids must be an integer tensor"):
        DenseIndex("flat").build(_corpus()).rows(torch.tensor([True, False]))


def test_search_with_embeddings_and_rows_fetch_other_shards(ranks):
    world, res = ranks
    corpus = _corpus()
    for rank in range(world):
        s, i, emb = res[rank]["with_embeddings"]
        _equal((s, i), _single(5, rank))
        assert torch.equal(emb, corpus[i])
        ids, rows = res[rank]["rows"]
        assert torch.equal(rows, corpus[ids])
        assert torch.equal(res[rank]["rows_1d"], corpus[: rank + 1])


def test_ivf_per_shard(ranks):
    """nprobe = nlist: every cell of every shard is searched, so the result is the flat one
    (exactly). nprobe < nlist: each shard's own quantiser; what is returned is still exact
    for its indices and in the defined order, empty slots (-1, -inf) last."""
    world, res = ranks
    corpus = _corpus()
    for rank in range(world):
        for k in KS:
            _equal(res[rank]["ivf_all"][k], _single(k, rank))
        s, i = res[rank]["ivf_few"]
        q = _queries(rank)
        for b in range(len(q)):
            found = [(float(x), j) for x, j in zip(s[b], i[b].tolist(), strict=True) if j >= 0]
            assert found == sorted(found, key=lambda t: (-t[0], t[1]))
            assert all(j >= 0 for j in i[b, : len(found)].tolist())  # holes only at the end
            assert bool((s[b, len(found) :] == float("-inf")).all())
            want = DenseIndex("flat").build(corpus).search(q[b : b + 1], N)
            score_of = dict(zip(want[1][0].tolist(), want[0][0].tolist(), strict=True))
            assert all(score_of[j] == x for x, j in found)


def test_refresh_embeds_only_the_local_rows(ranks):
    world, res = ranks
    for rank in range(world):
        a, b = res[rank]["shard"]
        texts = res[rank]["refresh_texts"]
        assert texts == [[f"t{j}" for j in range(a, b)]]  # one call, this shard's rows only
        _equal(res[rank]["refresh"], _single(4, rank))


def test_checkpoint_states(ranks):
    world, res = ranks
    for rank in range(world):
        assert res[rank]["state_embeddings"] is None  # the shards stay on their ranks
        _equal(res[rank]["restored"], _single(4, rank))  # a whole index's state, sliced


def test_empty_shards(ranks):
    world, res = ranks
    corpus = _corpus(2)
    sizes = [r["tiny_shard"][1] - r["tiny_shard"][0] for r in res]
    assert sum(sizes) == 2 and (world < 3 or 0 in sizes)
    for rank in range(world):
        want = DenseIndex("flat").build(corpus).search(_queries(rank), 2)
        _equal(res[rank]["tiny"], want)
        assert torch.equal(res[rank]["tiny_emb"], corpus[want[1]])


def test_errors_are_raised_on_every_rank(ranks):
    world, res = ranks
    ks = [2 + r for r in range(world)]
    for rank in range(world):
        assert res[rank]["err_k_differs"] == f"k must be the same on every rank, got {ks}"
        want = "queries: non-finite" if rank == 1 else "rank 1 of the sharded index search"
        assert res[rank]["err_nan"].startswith(want), res[rank]["err_nan"]
        _equal(res[rank]["after_errors"], _single(3, rank))


def test_scores_do_not_depend_on_the_query_batch():
    """A pair's score is the same searched alone or with 24 others (FAISS switches to BLAS
    at 20 queries), and ties wider than the first candidates are resolved (50 copies)."""
    g = torch.Generator().manual_seed(3)
    corpus = torch.nn.functional.normalize(torch.randn(300, 16, generator=g), dim=-1)
    corpus[100:150] = corpus[7]
    q = torch.nn.functional.normalize(torch.randn(25, 16, generator=g), dim=-1)
    q[3] = corpus[7]
    index = DenseIndex("flat").build(corpus)
    s, i = index.search(q, 30)
    alone = [index.search(q[b : b + 1], 30) for b in range(len(q))]
    assert torch.equal(s, torch.cat([a[0] for a in alone]))
    assert torch.equal(i, torch.cat([a[1] for a in alone]))
    assert i[3].tolist() == [7, *range(100, 129)]  # 51 tied: the lowest indices, in order
    # k = 3: FAISS's first 14 candidates hold 14 of the 51 tied rows, any 14; widened to all
    assert index.search(q[3:4], 3)[1].tolist() == [[7, 100, 101]]


class _AdversarialFaiss:
    """A FAISS index that breaks ties the worst way (the highest index first) and rounds its
    own scores differently, by up to 2^-24 (within the bound the index allows for)."""

    def __init__(self, index):
        self.index, self.ntotal = index, index.ntotal

    def search(self, q, m):
        g, i = self.index.search(q, self.ntotal)
        noise = np.random.default_rng(0).uniform(-1, 1, g.shape).astype(np.float32) * 2.0**-24
        g = g + noise * np.abs(g)
        order = np.lexsort((-i, -g), axis=-1)[:, :m]
        return np.take_along_axis(g, order, 1), np.take_along_axis(i, order, 1)


@pytest.mark.parametrize("k", [1, 3, 30], ids=lambda k: f"k{k}")
def test_the_order_does_not_depend_on_faiss_tie_breaking(k):
    """The first candidates FAISS returns may be any of the tied rows (a GPU index's
    selection is unordered): the search widens until every tied row is a candidate."""
    g = torch.Generator().manual_seed(4)
    corpus = torch.nn.functional.normalize(torch.randn(300, 16, generator=g), dim=-1)
    corpus[100:150] = corpus[7]
    q = torch.nn.functional.normalize(torch.randn(6, 16, generator=g), dim=-1)
    q[3] = corpus[7]
    want = DenseIndex("flat").build(corpus).search(q, k)
    index = DenseIndex("flat").build(corpus)
    index._index = _AdversarialFaiss(index._index)
    _equal(index.search(q, k), want)
    assert want[1][3].tolist() == [7, *range(100, 99 + k)]


def test_bad_input_names_the_argument():
    index = DenseIndex("flat").build(_corpus())
    with pytest.raises(ValueError, match="queries must have D=8"):
        index.search(torch.zeros(2, 5), 1)
    with pytest.raises(ValueError, match="queries must be a"):
        index.search(torch.zeros(8), 1)
    with pytest.raises(ValueError, match="queries: non-finite"):
        index.search(torch.full((1, 8), float("nan")), 1)
    with pytest.raises(ValueError, match="embeddings: non-finite"):
        DenseIndex().build(torch.full((3, 8), float("inf")))
    with pytest.raises(ValueError, match=r"ids must be corpus rows in \[0, 23\)"):
        index.rows(torch.tensor([23]))
    with pytest.raises(RuntimeError, match="before build"):
        DenseIndex().search(torch.zeros(1, 8), 1)
    with pytest.raises(RuntimeError, match="initialised torch.distributed"):
        ShardedIndex(10)


@pytest.mark.parametrize("align", [1, 4, 64], ids=lambda a: f"align{a}")
@pytest.mark.parametrize("world", [1, 2, 3, 7], ids=lambda w: f"world{w}")
def test_shard_range(world, align):
    for n in [0, 1, 2, 6, 23, 64, 65, 200, 1000]:
        bounds = [shard_range(n, world, r, align) for r in range(world)]
        assert bounds[0][0] == 0 and bounds[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:], strict=False))
        sizes = [b - a for a, b in bounds]
        if -(-n // align) >= world:  # whole blocks: starts aligned, at most one block apart
            assert all(a % align == 0 for a, _ in bounds)
            assert max(sizes) - min(sizes) <= align
        else:  # fewer blocks than ranks: by rows
            assert max(sizes) - min(sizes) <= 1
    with pytest.raises(ValueError, match="rank must be in"):
        shard_range(5, 2, 2)


# ------------------------------------------------------------------ the training loop
def _loop_config(out, **kw):
    return tiny_train_config(
        out, **(dict(steps=1, skip_initial_eval=True, eval_limit=2, max_new_tokens=2) | kw)
    )


def _questions(rank):
    ds = tiny_dataset()
    return [ex.question for ex in ds.train[rank::2]]  # each rank its own questions


def _counting(trainer):
    seen = []
    real = trainer.retriever.encode_docs

    def encode_docs(texts, **kw):
        if not kw.get("grad"):
            seen.extend(texts)
        return real(texts, **kw)

    trainer.retriever.encode_docs = encode_docs
    return seen


def _loop_worker(rank, world, port, out_dir):
    from rag_kernels.cotrain.training import CoTrainer, loop

    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world)
    )
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        res = {}
        for shards in ("world", "1"):
            cfg = _loop_config(os.path.join(out_dir, f"s{shards}"), index_shards=shards)
            tr = CoTrainer(cfg, dataset=tiny_dataset())
            res[f"kind_{shards}"] = type(tr.index).__name__
            seen = _counting(tr)
            tr.refresh_index()
            res[f"embedded_{shards}"] = list(seen)
            rows, scores, _ = tr.retrieve(_questions(rank), 3, grad=False)
            res[f"retrieve_{shards}"] = (rows.cpu(), scores.detach().cpu())
            res[f"step_{shards}"] = tr.train_step()
        # shared encoder, refreshed every step, contrastive (gold rows from other shards)
        cfg = _loop_config(
            os.path.join(out_dir, "shared"),
            doc_encoder="shared",
            refresh_every=1,
            retriever_objective="contrastive",
        )
        tr = CoTrainer(cfg, dataset=tiny_dataset())
        tr.refresh_index()
        seen = _counting(tr)
        res["shared_step"] = tr.train_step()
        res["shared_refreshed"] = list(seen)
        res["shared_state"] = tr.state_dict()["index"]["embeddings"]
        # a checkpoint's sharded index is re-embedded at the next search; a warning when the
        # run's index was older than the checkpoint (no refresh at step 1 with every 2)
        warnings = []
        loop.warn = warnings.append
        for every in (1, 2):
            if every == 2:
                cfg = dataclasses.replace(cfg, refresh_every=2)
                tr = CoTrainer(cfg, dataset=tiny_dataset())
                tr.refresh_index()
                tr.train_step()
            tr.index.load_state_dict(tr.state_dict()["index"])
            seen = _counting(tr)
            rows, _, _ = tr.retrieve(_questions(rank), 3, grad=False)
            res[f"reloaded_{every}"] = (tr.index.built_at, list(seen), list(warnings), rows)
        # the whole run: train, final evaluation, outputs (rank 0)
        res["fit"] = CoTrainer(
            _loop_config(os.path.join(out_dir, "fit")), dataset=tiny_dataset()
        ).fit()["final"]
        torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def loop_ranks(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("loop"))
    return out, _spawn(_loop_worker, 2, out)


def test_loop_shards_the_index_under_torchrun(loop_ranks):
    _, res = loop_ranks
    assert [r["kind_world"] for r in res] == ["ShardedIndex", "ShardedIndex"]
    assert [r["kind_1"] for r in res] == ["DenseIndex", "DenseIndex"]
    n0, n1 = len(res[0]["embedded_world"]), len(res[1]["embedded_world"])
    assert (n0, n1) == (4, 4) and len(res[0]["embedded_1"]) == len(tiny_dataset().corpus)
    assert res[0]["embedded_world"] + res[1]["embedded_world"] == res[0]["embedded_1"]


def test_loop_retrieval_equals_one_process(loop_ranks, tmp_path):
    from rag_kernels.cotrain.training import CoTrainer

    _, res = loop_ranks
    tr = CoTrainer(_loop_config(tmp_path / "single"), dataset=tiny_dataset())
    tr.refresh_index()
    for rank in (0, 1):
        rows, scores, _ = tr.retrieve(_questions(rank), 3, grad=False)
        for shards in ("world", "1"):
            got_rows, got_scores = res[rank][f"retrieve_{shards}"]
            assert torch.equal(got_rows, rows)
            # embedded in other batches than one process (4 passages vs 8): last bits only
            torch.testing.assert_close(got_scores, scores.detach(), rtol=1e-5, atol=1e-6)


def test_loop_trains_as_with_the_replicated_index(loop_ranks):
    _, res = loop_ranks
    for rank in (0, 1):
        a, b = res[rank]["step_world"], res[rank]["step_1"]
        for key in ("loss", "generator", "retriever", "grad_norm_generator"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), key


def test_loop_refresh_and_rows_with_a_shared_encoder(loop_ranks):
    _, res = loop_ranks
    shard = [res[r]["embedded_world"] for r in (0, 1)]
    for rank in (0, 1):
        assert res[rank]["shared_refreshed"] == shard[rank]  # the step's refresh: own rows
        assert np.isfinite(res[rank]["shared_step"]["loss"])
        assert res[rank]["shared_state"] is None


def test_loop_resumed_sharded_index_is_re_embedded(loop_ranks):
    _, res = loop_ranks
    for rank in (0, 1):
        shard = res[rank]["embedded_world"]
        built, seen, warnings, _ = res[rank]["reloaded_1"]  # checkpoint at a refresh step
        assert (built, seen, warnings) == (1, shard, [])
        built, seen, warnings, _ = res[rank]["reloaded_2"]  # the run's index was from step 0
        assert built == 1 and seen == shard
        if rank == 0:
            assert len(warnings) == 1 and "built at step 0" in warnings[0], warnings
            assert "weights of step 1" in warnings[0]
        else:
            assert warnings == []  # rank 0 speaks for the run


def test_loop_fit_runs_to_the_end(loop_ranks):
    out, res = loop_ranks
    with open(os.path.join(out, "fit", "metrics.json")) as fh:
        metrics = json.load(fh)
    assert metrics["final"]["n"] == 2 and metrics["final"] == res[0]["fit"] == res[1]["fit"]
    assert os.path.exists(os.path.join(out, "fit", "checkpoint.pt"))


def test_index_shards_resume_rule():
    from rag_kernels.cotrain.training.config import TrainConfig, resume_differences

    flat = dataclasses.asdict(TrainConfig())
    one = dict(flat, index_shards="1")
    data1, data2 = {"world_size": 1}, {"world_size": 2}
    assert resume_differences(flat, one, data1, data1) == ([], [])  # one process: free
    assert resume_differences(flat, one, data2, data2) == ([], ["--index-shards world → 1"])
    ivf = dict(flat, ivf_nlist=16)
    unsafe, _ = resume_differences(ivf, dict(ivf, index_shards="1"), data2, data2)
    assert unsafe == ["--index-shards world → 1 with an IVF index (one quantiser per shard)"]
    old = {k: v for k, v in flat.items() if k != "index_shards"}  # before the option: "1"
    assert resume_differences(old, one, data2, data2) == ([], [])
    assert resume_differences(old, flat, data2, data2)[1] == ["--index-shards 1 → world"]
