"""Per-scan imaging descriptors (four families) against a training-split reference.

Names are dotted: ``fc.within.<net>``, ``fc.between.<a>~<b>``, ``fc.partial_within.<net>``,
``grad.G<k>.range``, ``grad.G<k>.variance``, ``grad.G<k>.<net>``, ``ica.amplitude.<ic>``,
``ica.variability.<ic>``, ``ica.band_ratio.<ic>``, ``ica.fnc.<ic>~<ic>``, ``falff.<net>``,
``graph.strength.<net>``, ``graph.modularity``, ``graph.global_efficiency``,
``graph.clustering``, ``graph.participation``. ICA components are named ``IC<k>-<network>`` after
the network that dominates their map.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass

import numpy as np

from fmrilm.data.signal import robust_scale
from fmrilm.errors import UserError
from fmrilm.features import connectivity, gradients, graph, ica

N_GRADIENTS = 3


@dataclass
class Reference:
    """Group-level quantities from the training split that every scan is described against."""

    networks: list[str]  # network of each ROI
    gradients: np.ndarray  # [rois, N_GRADIENTS] gradients of the mean training FC
    ica_maps: np.ndarray  # [rois, components] group spatial ICA maps
    ica_names: list[str]  # IC<k>-<dominant network>
    train_scans: list[str]

    def to_bytes(self) -> bytes:
        buf = io.BytesIO()
        np.savez(buf, gradients=self.gradients, ica_maps=self.ica_maps,
                 meta=np.frombuffer(json.dumps({"networks": self.networks, "ica_names": self.ica_names, "train_scans": self.train_scans}).encode(), dtype=np.uint8))
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> "Reference":
        z = np.load(io.BytesIO(data))
        meta = json.loads(z["meta"].tobytes().decode())
        return cls(meta["networks"], z["gradients"], z["ica_maps"], meta["ica_names"], meta["train_scans"])


def mean_fc(series: list[np.ndarray]) -> np.ndarray:
    """Group FC: the Fisher-z average of the scans' Pearson FC (``[rois, time]`` each)."""
    zs = [np.arctanh(np.clip(connectivity.pearson_fc(robust_scale(s)), -0.999999, 0.999999)) for s in series]
    fc = np.tanh(np.mean(zs, axis=0))
    np.fill_diagonal(fc, 1.0)
    return fc


class DescriptorReferenceError(UserError, ValueError):
    """The training scans cannot define the descriptors' reference."""


def build_reference(series: list[np.ndarray], networks: list[str], scan_ids: list[str], n_components: int = 8, seed: int = 0) -> Reference:
    """Fit the reference on training scans only: group gradients and group ICA maps."""
    if not series:
        raise DescriptorReferenceError("the descriptors' reference needs at least one training scan: the train split is "
                                       "empty (check the datasets' split policy)")
    if len(networks) != series[0].shape[0]:
        raise DescriptorReferenceError(f"the ROI->network map has {len(networks)} entries but scans have {series[0].shape[0]} "
                                       "ROIs: fix roi_networks in the dataset's manifest (or its card) to list every ROI")
    ref_grad = gradients.gradients(mean_fc(series), N_GRADIENTS)
    maps = ica.group_ica([robust_scale(s) for s in series], n_components, seed)
    names = [f"IC{k}-{net}" for k, net in enumerate(ica.dominant_network(maps, networks))]
    return Reference(list(networks), ref_grad, maps, names, list(scan_ids))


def scan_descriptors(ts: np.ndarray, tr: float, ref: Reference, density: float = 0.1, seed: int = 0) -> dict[str, float]:
    """All descriptors of one scan: raw ``[rois, time]`` series and its TR -> name -> value."""
    from fmrilm.data.schema import timeseries_problems

    problems = timeseries_problems(np.asarray(ts), None)
    if problems:
        raise ValueError("; ".join(problems))
    x = robust_scale(ts)
    nets = ref.networks
    out: dict[str, float] = {}

    fc = connectivity.pearson_fc(x)
    names, net_fc = connectivity.network_means(fc, nets)
    for a, na in enumerate(names):
        out[f"fc.within.{na}"] = net_fc[a, a]
        for b in range(a + 1, len(names)):
            out[f"fc.between.{na}~{names[b]}"] = net_fc[a, b]
    _, net_pfc = connectivity.network_means(connectivity.partial_fc(x), nets)
    for a, na in enumerate(names):
        out[f"fc.partial_within.{na}"] = net_pfc[a, a]

    g = gradients.procrustes_align(gradients.gradients(fc, N_GRADIENTS), ref.gradients)
    nets_arr = np.asarray(nets)
    for k in range(g.shape[1]):
        out[f"grad.G{k + 1}.range"] = float(np.ptp(g[:, k]))
        out[f"grad.G{k + 1}.variance"] = float(g[:, k].var())
        if k < 2:
            for n in names:
                out[f"grad.G{k + 1}.{n}"] = float(g[nets_arr == n, k].mean())

    tc = ica.dual_regression(x, ref.ica_maps)
    amp, var, ratio = tc.std(axis=1), ica.variability(tc), ica.band_ratio(tc, tr)
    fnc = np.corrcoef(tc)
    for c, ic in enumerate(ref.ica_names):
        out[f"ica.amplitude.{ic}"] = amp[c]
        out[f"ica.variability.{ic}"] = var[c]
        out[f"ica.band_ratio.{ic}"] = ratio[c]
        for d in range(c + 1, len(ref.ica_names)):
            out[f"ica.fnc.{ic}~{ref.ica_names[d]}"] = fnc[c, d]
    roi_falff = ica.falff(x, tr)
    for n in names:
        out[f"falff.{n}"] = float(np.nanmean(roi_falff[nets_arr == n]))

    gm = graph.graph_metrics(fc, nets, density, seed)
    for n in names:
        out[f"graph.strength.{n}"] = float(gm["strength"][nets_arr == n].mean())
    for key in ("modularity", "global_efficiency", "clustering", "participation"):
        out[f"graph.{key}"] = gm[key]
    return {k: float(v) for k, v in out.items()}


def zscore_stats(rows: list[dict[str, float]]) -> dict[str, tuple[float, float]]:
    """Mean and standard deviation of each descriptor over (training) rows."""
    keys = sorted({k for r in rows for k in r})
    stats = {}
    for k in keys:
        v = np.array([r.get(k, np.nan) for r in rows], dtype=float)
        v = v[np.isfinite(v)]
        stats[k] = (float(v.mean()) if v.size else np.nan, float(v.std(ddof=1)) if v.size > 1 else np.nan)
    return stats


def zscore(row: dict[str, float], stats: dict[str, tuple[float, float]]) -> dict[str, float]:
    """z-scores of one scan's descriptors against (training) statistics; a zero or undefined
    spread gives z = 0."""
    out = {}
    for k, (mu, sd) in stats.items():
        v = row.get(k, np.nan)
        out[k] = float((v - mu) / sd) if np.isfinite(v) and np.isfinite(sd) and sd > 0 else 0.0
    return out
