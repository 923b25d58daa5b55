"""``fmrilm bench ingest``: the Ray Data pipeline vs a plain pyarrow read, same files, same run.

Both sides read the same parquet shards from a local S3 server (moto, loopback), robust-scale
each scan and cut windows, and hand out torch batches. Ours: ``build_windows`` ->
``iter_torch_batches``. Baseline: ``pyarrow.parquet.read_table`` per shard + the same numpy
transforms in one process. The figure is ``ratio = ours throughput / baseline throughput``.

With ``nodes > 1`` the pipeline runs on a cluster of that many Ray nodes on loopback
(:class:`fmrilm.local_cluster.LocalCluster`), twice in the same run: its tasks placed by Ray over
every node (blocks made on another node cross to the consumer's object store), and pinned to the
head node, where the consumer runs. On one machine the difference is the cost of moving blocks
between nodes, not a speed-up: the nodes share the same cores.
"""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import torch

from fmrilm.bench.common import machine, time_side_by_side
from fmrilm.data import table
from fmrilm.data.pipeline import PipelineSpec, build_windows, torch_batches
from fmrilm.data.signal import robust_scale, windows
from fmrilm.errors import UserError

TARGET = 0.9
OBJECT_STORE_MB = 2048  # per loopback node: more than the benchmark's data, so nothing spills


def plain_pyarrow(spec: PipelineSpec, batch_size: int) -> dict:
    """The baseline: read every shard with pyarrow, same transforms in numpy, torch batches."""
    n_windows, n_bytes, n_scans, buf = 0, 0, 0, []
    for loc, manifest in table.find_datasets(spec.root):
        for path in table.shard_paths(loc, manifest):
            t = pq.read_table(path, filesystem=loc.fs, columns=["scan_id", "n_rois", "n_timepoints", "timeseries"])
            flat = t.column("timeseries").combine_chunks()
            offsets, values = flat.offsets.to_numpy(), flat.values.to_numpy(zero_copy_only=False)
            rois, tps = t.column("n_rois").to_numpy(), t.column("n_timepoints").to_numpy()
            for i in range(t.num_rows):
                ts = values[offsets[i] : offsets[i + 1]].reshape(rois[i], tps[i])
                n_bytes += ts.nbytes
                n_scans += 1
                buf.append(windows(robust_scale(ts), spec.window, spec.stride))
                while sum(len(b) for b in buf) >= batch_size:
                    stacked = np.concatenate(buf)
                    x = torch.from_numpy(np.ascontiguousarray(stacked[:batch_size]))
                    n_windows += x.shape[0]
                    buf = [stacked[batch_size:]]
    if buf and sum(len(b) for b in buf):
        n_windows += torch.from_numpy(np.concatenate(buf)).shape[0]
    return {"windows": n_windows, "scans": n_scans, "bytes": n_bytes}


def ray_data(spec: PipelineSpec, batch_size: int, n_bytes: int, n_scans: int) -> dict:
    """Ours: the Ray Data pipeline streamed as torch batches."""
    ds, _ = build_windows(spec, None)
    n = sum(b["x"].shape[0] for b in torch_batches(ds, batch_size))
    return {"windows": n, "scans": n_scans, "bytes": n_bytes}


def ray_data_on(node_id: str | None, spec: PipelineSpec, batch_size: int, n_bytes: int, n_scans: int) -> dict:
    """:func:`ray_data` with every read and map task on node ``node_id`` (None: wherever Ray
    schedules them)."""
    from ray.data import DataContext
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    ctx = DataContext.get_current()
    saved = ctx.scheduling_strategy, ctx.scheduling_strategy_large_args
    if node_id is not None:
        ctx.scheduling_strategy = ctx.scheduling_strategy_large_args = NodeAffinitySchedulingStrategy(node_id, soft=False)
    try:
        return ray_data(spec, batch_size, n_bytes, n_scans)
    finally:
        ctx.scheduling_strategy, ctx.scheduling_strategy_large_args = saved


def run_benchmark(subjects: int = 256, timepoints: int = 1200, rois: int = 200, repeats: int = 3, batch_size: int = 64,
                  nodes: int = 1) -> dict:
    """Generate a synthetic cohort into a local S3 server, time both sides (and, with ``nodes > 1``,
    the pipeline on that many loopback nodes, spread and pinned to the head); returns the result dict."""
    from contextlib import ExitStack

    from fmrilm import runtime
    from fmrilm.data.ingest import ingest_synthetic
    from fmrilm.data.synth import SynthParams
    from fmrilm.local_cluster import LocalCluster
    from fmrilm.local_s3 import LocalS3

    with ExitStack() as stack:
        s3 = stack.enter_context(LocalS3(bucket="fmrilm-bench"))
        root = s3.uri("datasets")
        params = SynthParams(name="bench", subjects=subjects, n_rois=rois, n_timepoints=timepoints, seed=0)
        manifest = ingest_synthetic(params, root, use_ray=False).manifest
        import ray

        cluster = None
        if nodes > 1:
            if ray.is_initialized():
                raise UserError("bench ingest --nodes needs a process not yet connected to Ray (run it from the command line)")
            cluster = stack.enter_context(LocalCluster(workers=nodes - 1, head_cpus=machine()["cpus"] or 2, object_store_mb=OBJECT_STORE_MB))
        runtime.init_ray(cluster.gcs if cluster else None)
        if cluster:
            stack.callback(ray.shutdown)  # before the cluster stops
        from ray.data import DataContext

        DataContext.get_current().enable_progress_bars = False
        spec = PipelineSpec(root=root, window=32, stride=32, normalise=True)
        first = plain_pyarrow(spec, batch_size)
        sides = {"ray_data": lambda: ray_data(spec, batch_size, first["bytes"], first["scans"]),
                 "pyarrow": lambda: plain_pyarrow(spec, batch_size)}
        if cluster:
            sides["ray_data_head_node"] = lambda: ray_data_on(cluster.node_ids["head"], spec, batch_size, first["bytes"], first["scans"])
        results = time_side_by_side(sides, repeats=repeats)
    if results["ray_data"]["windows"] != results["pyarrow"]["windows"]:
        raise RuntimeError(f"the two sides saw different data: {results['ray_data']['windows']} vs {results['pyarrow']['windows']} windows")
    for side in results.values():
        side["windows_per_s"] = side["windows"] / side["seconds"]
        side["scans_per_s"] = side["scans"] / side["seconds"]
        side["mb_per_s"] = side["bytes"] / 2**20 / side["seconds"]
    ratio = results["ray_data"]["windows_per_s"] / results["pyarrow"]["windows_per_s"]
    r, p = results["ray_data"], results["pyarrow"]
    summary = (f"bench ingest: Ray Data {r['scans_per_s']:.1f} scans/s ({r['mb_per_s']:.1f} MB/s), plain pyarrow "
               f"{p['scans_per_s']:.1f} scans/s ({p['mb_per_s']:.1f} MB/s); ratio {ratio:.2f} (target >= {TARGET}) "
               f"on {machine()['cpus']} CPUs, {len(manifest['shards'])} shards from a local S3 server")
    out = {"benchmark": "ingest", "ratio": ratio, "target": TARGET, "machine": machine(), "nodes": nodes,
           "data": {"subjects": subjects, "rois": rois, "timepoints": timepoints, "shards": len(manifest["shards"]),
                    "windows": r["windows"], "mb": r["bytes"] / 2**20},
           "ray_data": r, "pyarrow": p, "summary": summary}
    if nodes > 1:
        h = results["ray_data_head_node"]
        out["ray_data_head_node"] = h
        out["spread_over_head_node"] = r["windows_per_s"] / h["windows_per_s"]
        out["summary"] += (f"; on {nodes} loopback nodes: tasks placed by Ray over all nodes {r['scans_per_s']:.1f} scans/s, pinned "
                           f"to the head node {h['scans_per_s']:.1f} scans/s (ratio {out['spread_over_head_node']:.2f}: the cost of "
                           "moving blocks between nodes on one machine, not a speed-up)")
    return out

