"""Reductions over ranks: the identity without a process group; over two gloo ranks on loopback,
sums and means of keys that only some ranks saw, and the quantizer's codebook fitted together."""

import socket

import torch.multiprocessing as mp

from fmrilm.ranks import mean_across_ranks, sum_across_ranks


def test_without_a_process_group_values_are_this_process_s():
    assert sum_across_ranks({"a": 1.5}, "cpu") == {"a": 1.5}
    assert mean_across_ranks({"a": 3.0}, {"a": 2.0}, ("a", "b"), "cpu") == {"a": 1.5}  # b: nobody counted it


def _worker(rank, port, results):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        sums, counts = ({"a": 4.0}, {"a": 2.0}) if rank == 0 else ({"a": 2.0, "b": 9.0}, {"a": 2.0, "b": 3.0})
        results[rank] = (sum_across_ranks({"x": float(rank + 1)}, "cpu"), mean_across_ranks(sums, counts, ("a", "b", "c"), "cpu"))
    finally:
        dist.destroy_process_group()


def test_two_ranks_reduce_to_the_same_sums_and_means():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results = mp.Manager().dict()
    mp.spawn(_worker, args=(port, results), nprocs=2)
    for rank in (0, 1):
        assert results[rank] == ({"x": 3.0}, {"a": 1.5, "b": 3.0})


def _quantizer_worker(rank, port, results):
    import torch
    import torch.distributed as dist

    from fmrilm.models.quantizer import VectorQuantizer

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        torch.manual_seed(rank)
        vq = VectorQuantizer(16, 4).train()
        ready = []
        for _ in range(6):  # rank 1 alone would hold 16 vectors after 3 steps, rank 0 after 6
            vq(torch.randn(3 if rank == 0 else 7, 4))
            ready.append(bool(vq.initialized))
        results[rank] = (ready, vq.codebook.tolist())
    finally:
        dist.destroy_process_group()


def test_the_codebook_is_fitted_at_the_same_step_on_every_rank():
    """The k-means initialisation waits for rank 0's vectors: ranks holding unequal counts still
    fit together (a rank alone in a collective would hang) and keep one codebook."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results = mp.Manager().dict()
    mp.spawn(_quantizer_worker, args=(port, results), nprocs=2)
    assert results[0][0] == results[1][0] == [False] * 5 + [True]
    assert results[0][1] == results[1][1]
