"""Reductions over ranks: the identity without a process group; over two gloo ranks on loopback,
sums and means of keys that only some ranks saw."""

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
