"""Graph metrics on a proportionally thresholded |FC| graph (networkx)."""

from __future__ import annotations

import networkx as nx
import numpy as np


def proportional_threshold(fc: np.ndarray, density: float = 0.1) -> np.ndarray:
    """Keep the strongest ``density`` fraction of off-diagonal |FC| edges: ``[rois, rois]`` ->
    symmetric weighted adjacency (zeros elsewhere, zero diagonal)."""
    w = np.abs(np.asarray(fc, dtype=np.float64))
    np.fill_diagonal(w, 0.0)
    iu = np.triu_indices_from(w, 1)
    n_keep = max(1, int(round(density * iu[0].size)))
    order = np.argsort(w[iu])[::-1][:n_keep]
    adj = np.zeros_like(w)
    adj[iu[0][order], iu[1][order]] = w[iu][order]
    return adj + adj.T


def to_graph(adj: np.ndarray) -> nx.Graph:
    g = nx.from_numpy_array(adj)
    g.remove_edges_from(nx.selfloop_edges(g))
    return g


def louvain_modularity(adj: np.ndarray, seed: int = 0) -> float:
    """Modularity Q of the seeded Louvain partition of a weighted graph."""
    g = to_graph(adj)
    if g.number_of_edges() == 0:
        return 0.0
    parts = nx.community.louvain_communities(g, weight="weight", seed=seed)
    return float(nx.community.modularity(g, parts, weight="weight"))


def participation(adj: np.ndarray, modules: list[str]) -> np.ndarray:
    """Participation coefficient per node w.r.t. given modules: ``1 - sum_s (k_is / k_i)^2``."""
    mods = np.asarray(modules)
    k = adj.sum(axis=1)
    share = np.stack([adj[:, mods == m].sum(axis=1) for m in dict.fromkeys(modules)], axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        p = 1.0 - ((share / k[:, None]) ** 2).sum(axis=1)
    return np.where(k > 0, p, 0.0)


def graph_metrics(fc: np.ndarray, networks: list[str], density: float = 0.1, seed: int = 0) -> dict:
    """Strength per ROI, Louvain modularity, global efficiency, average clustering and mean
    participation of the thresholded graph. Returns plain floats and a ``strength`` array."""
    adj = proportional_threshold(fc, density)
    g = to_graph(adj)
    binary = to_graph((adj > 0).astype(float))
    return {
        "strength": adj.sum(axis=1),
        "modularity": louvain_modularity(adj, seed),
        "global_efficiency": float(nx.global_efficiency(binary)),
        "clustering": float(nx.average_clustering(g, weight="weight")),
        "participation": float(participation(adj, networks).mean()),
    }
