"""Synthetic cohort with planted, known effects of sex, age and site on network connectivity.

Generative model (all draws seeded; subject ``i`` of a cohort is a pure function of
``(params, i)``):

* ROIs are split into ``n_networks`` contiguous networks (canonical Yeo-7 names first). ROI ``i``
  has a loading ``w_i ~ U(0.5, 0.85)`` on its network's signal.
* Cohort baseline network coupling ``R0`` (a correlation matrix, off-diagonals in [-0.1, 0.35]).
* Subject ``s`` with sex ``x_s`` (+1/2 female, -1/2 male), standardised age ``a_s`` and site ``k``
  gets network coupling::

      R_s = R0 + sex_effect * x_s * P_sex + age_effect * a_s * P_age + site_effect * P_site[k]
            + E_s,     E_s symmetric, entries N(0, subject_noise)

  projected to the nearest valid correlation matrix. ``P_sex`` is +1 for (DefaultMode,
  Frontoparietal) and -1 for (Somatomotor, Visual); ``P_age`` is -1 for (DefaultMode,
  DorsalAttention) and +1 for (Frontoparietal, VentralAttention) (with fewer networks, the first
  available pairs); ``P_site[k]`` is a random symmetric +/-1 pattern per site.
* Network signals are AR(1) with ``phi = exp(-TR / 3 s)`` and innovations correlated by
  ``chol(R_s)``, so their stationary correlation is ``R_s``. ROI signal
  ``y_i = w_i z_net(i) + sqrt(1 - w_i^2) u_i`` with independent AR(1) noise ``u_i``; hence the
  expected ROI-level FC between networks ``A != B`` is ``w_i w_j R_s[A, B]``.
* Raw intensities: ``baseline_i + amplitude_i * site_gain_k * y_i`` (baseline ~ U(500, 1500),
  amplitude 1-3 % of baseline), so normalisation matters as with real BOLD.

Dynamic effects (``dynamic_effects``; none by default). Each subject then also gets a diagnosis,
``Case`` or ``Control`` (1/2 each, independent of sex, age and site), carried only by the listed
effects, each built so that the expected same-time correlation of every ROI pair is the same in
both groups (static FC cannot see it):

* ``timescale``: Case scans have every time constant (network signals and ROI noise alike)
  longer by ``timescale_effect`` (default 10 %: 3.0 -> 3.3 s). AR(1) signals with one ``phi``
  and correlated innovations keep their stationary correlation ``R_s``, so FC is unchanged;
  the ROI autocorrelation changes (lag-1 0.51 -> 0.55 at TR 2 s).
* ``lag``: one network drives another ``lag_trs`` TRs later (``LAG_PAIR``, default 2 TR):
  ``z_follow(t) <- sqrt(1 - c^2) z_follow(t) + c z_lead(t - lag)``, ``c = lag_strength``
  (default 0.3). Control: the first network of the pair leads; Case: the second. Both directions
  add the same ``c phi^lag`` to the pair's same-time correlation; the lagged cross-correlation
  is asymmetric the other way round.
* ``dwell``: network coupling switches between two states, ``R_s +/- state_coupling * P_state``
  (``P_state`` +/-1 on the three ``STATE_PAIRS``; default 0.7), a Markov chain with mean dwell
  ``dwell_trs`` = (Control, Case) TRs (default 6 vs 40). Both states are equally likely, so the
  mean coupling is ``R_s``; long dwells make windowed FC wander.
* ``bursts``: Case scans get global amplitude bursts: each TR starts one with probability
  ``burst_rate`` (default 0.03), lasting ``burst_trs`` TRs (default 4), during which every ROI's
  fluctuation is multiplied by ``burst_gain`` (default 2.5). A common gain independent of the
  signal leaves correlations unchanged and fattens the amplitude distribution's tails.

The oracle (``oracle()``) returns the true effect patterns at ROI level, e.g.
``d FC_ij / d sex = sex_effect * w_i w_j P_sex[A, B]`` (female minus male), the quantities an
FC + linear model can at best recover.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import Field

from fmrilm.config import Strict

NETWORK_NAMES = ["Visual", "Somatomotor", "DorsalAttention", "VentralAttention", "Limbic", "Frontoparietal", "DefaultMode"]
AGE_RANGE = (8.0, 80.0)
SEX_PAIRS = [("DefaultMode", "Frontoparietal", 1.0), ("Somatomotor", "Visual", -1.0)]
AGE_PAIRS = [("DefaultMode", "DorsalAttention", -1.0), ("Frontoparietal", "VentralAttention", 1.0)]
LAG_PAIR = ("Visual", "DorsalAttention")  # Control: Visual leads; Case: DorsalAttention leads
STATE_PAIRS = [("Somatomotor", "VentralAttention", 1.0), ("Limbic", "DefaultMode", 1.0), ("Visual", "Frontoparietal", -1.0)]
DYNAMIC_EFFECTS = ("timescale", "lag", "dwell", "bursts")
DIAGNOSES = ("Control", "Case")


class SynthParams(Strict):
    """Parameters of a synthetic cohort (every field documented in the module docstring)."""

    name: str = "synthetic"
    subjects: int = Field(48, ge=1)
    sessions: int = Field(1, ge=1, description="scans per subject")
    n_rois: int = Field(42, ge=4)
    n_networks: int = Field(7, ge=2)
    n_timepoints: int = Field(200, ge=16)
    tr: float = Field(2.0, gt=0)
    n_sites: int = Field(2, ge=1)
    sex_effect: float = 0.3
    age_effect: float = 0.2
    site_effect: float = 0.1
    subject_noise: float = Field(0.05, ge=0)
    dynamic_effects: list[Literal["timescale", "lag", "dwell", "bursts"]] = Field(
        [], description="dynamic effects that carry a Case/Control diagnosis (none: no diagnosis)")
    timescale_effect: float = Field(0.10, ge=0, description="Case: time constants longer by this fraction")
    lag_trs: int = Field(2, ge=1, description="lag between the driving and the driven network")
    lag_strength: float = Field(0.3, ge=0, lt=1, description="weight of the lagged drive")
    dwell_trs: tuple[float, float] = Field((6.0, 40.0), description="mean state dwell in TRs: (Control, Case)")
    state_coupling: float = Field(0.7, ge=0, description="+/- coupling change of the two states on STATE_PAIRS")
    burst_rate: float = Field(0.03, ge=0, le=1, description="Case: probability per TR that a global burst starts")
    burst_trs: int = Field(4, ge=1)
    burst_gain: float = Field(2.5, ge=1)
    seed: int = 0


def network_names(params: SynthParams) -> list[str]:
    k = params.n_networks
    return NETWORK_NAMES[:k] if k <= len(NETWORK_NAMES) else NETWORK_NAMES + [f"Net{i}" for i in range(len(NETWORK_NAMES), k)]


def roi_networks(params: SynthParams) -> np.ndarray:
    """Network index of each ROI, ``[rois]`` (contiguous, near-equal blocks)."""
    if params.n_networks > params.n_rois:
        raise ValueError(f"n_networks ({params.n_networks}) cannot exceed n_rois ({params.n_rois})")
    return np.repeat(np.arange(params.n_networks), np.diff(np.linspace(0, params.n_rois, params.n_networks + 1).round().astype(int)))


def roi_labels(params: SynthParams) -> list[str]:
    names, nets = network_names(params), roi_networks(params)
    return [f"{names[n]}_{i:03d}" for i, n in enumerate(nets)]


def _pair_pattern(names: list[str], pairs: list[tuple[str, str, float]], fallback: int) -> np.ndarray:
    k = len(names)
    p = np.zeros((k, k))
    used = [(names.index(a), names.index(b), s) for a, b, s in pairs if a in names and b in names]
    if not used:  # fewer networks than the canonical set: first available off-diagonal pairs
        used = [(fallback % k, (fallback + 1) % k, 1.0)]
    for a, b, s in used:
        p[a, b] = p[b, a] = s
    return p


def _cohort(params: SynthParams) -> dict:
    """Cohort-level structure shared by every subject (deterministic in ``params.seed``)."""
    rng = np.random.default_rng([params.seed, 7919])
    k, names = params.n_networks, network_names(params)
    r0 = rng.uniform(-0.1, 0.35, size=(k, k))
    r0 = np.triu(r0, 1) + np.triu(r0, 1).T + np.eye(k)
    site = rng.choice([-1.0, 1.0], size=(params.n_sites, k, k)) * (1 - np.eye(k))
    site = np.triu(site, 1) + np.transpose(np.triu(site, 1), (0, 2, 1))
    return {
        "names": names,
        "nets": roi_networks(params),
        "loadings": rng.uniform(0.5, 0.85, size=params.n_rois),
        "baseline": rng.uniform(500, 1500, size=params.n_rois),
        "amplitude": rng.uniform(0.01, 0.03, size=params.n_rois),
        "site_gain": rng.uniform(0.8, 1.25, size=params.n_sites),
        "R0": r0,
        "P_sex": _pair_pattern(names, SEX_PAIRS, 0),
        "P_age": _pair_pattern(names, AGE_PAIRS, 1),
        "P_site": site,
        "P_state": _pair_pattern(names, STATE_PAIRS, 2),
        "lag_pair": [names.index(n) for n in LAG_PAIR] if all(n in names for n in LAG_PAIR) else [0, 1],
    }


def subject(params: SynthParams, index: int) -> dict:
    """Attributes of subject ``index``: id, sex ('M'/'F'), age (years), site index, diagnosis
    ('Case'/'Control' with dynamic effects, else None)."""
    rng = np.random.default_rng([params.seed, index, 1])
    out = {
        "subject_id": f"{index:04d}",
        "sex": "F" if rng.random() < 0.5 else "M",
        "age": float(np.round(rng.uniform(*AGE_RANGE), 1)),
        "site": int(rng.integers(params.n_sites)),
        "diagnosis": None,
    }
    if params.dynamic_effects:  # its own stream: sex, age and site are those of the cohort without dynamics
        out["diagnosis"] = DIAGNOSES[int(np.random.default_rng([params.seed, index, 4]).random() < 0.5)]
    return out


def age_z(age: float) -> float:
    lo, hi = AGE_RANGE
    return (age - (lo + hi) / 2) / ((hi - lo) / np.sqrt(12))


def _nearest_correlation(r: np.ndarray, floor: float = 0.05) -> np.ndarray:
    vals, vecs = np.linalg.eigh((r + r.T) / 2)
    r = (vecs * np.maximum(vals, floor)) @ vecs.T
    d = np.sqrt(np.diag(r))
    return r / np.outer(d, d)


def network_coupling(params: SynthParams, index: int, session: int = 0, cohort: dict | None = None) -> np.ndarray:
    """The subject's true network correlation matrix ``R_s``, ``[networks, networks]``."""
    c = cohort or _cohort(params)
    s = subject(params, index)
    rng = np.random.default_rng([params.seed, index, 2])
    noise = rng.normal(0, params.subject_noise, size=c["R0"].shape)
    noise = np.triu(noise, 1) + np.triu(noise, 1).T
    r = (c["R0"] + params.sex_effect * (0.5 if s["sex"] == "F" else -0.5) * c["P_sex"]
         + params.age_effect * age_z(s["age"]) * c["P_age"] + params.site_effect * c["P_site"][s["site"]] + noise)
    return _nearest_correlation(r)


def _ar1(rng: np.random.Generator, n: int, t: int, phi: float, chol: np.ndarray | None = None,
         states: np.ndarray | None = None) -> np.ndarray:
    """AR(1) series ``[n, t]`` with unit stationary variance; innovations correlated by ``chol``
    (``[n, n]``, or ``[states, n, n]`` indexed by ``states [t]``)."""
    e = rng.standard_normal((n, t))
    if chol is not None and states is not None:
        for k in range(len(chol)):
            e[:, states == k] = chol[k] @ e[:, states == k]
    elif chol is not None:
        e = chol @ e
    out = np.empty((n, t))
    out[:, 0] = e[:, 0]
    scale = np.sqrt(1 - phi**2)
    for i in range(1, t):
        out[:, i] = phi * out[:, i - 1] + scale * e[:, i]
    return out


def _markov_states(rng: np.random.Generator, t: int, dwell: float) -> np.ndarray:
    """Two-state chain ``[t]`` of 0/1 with mean dwell ``dwell`` steps, starting in either state."""
    switch = rng.random(t) < 1.0 / max(dwell, 1.0)
    switch[0] = rng.random() < 0.5
    return np.cumsum(switch) % 2


def _bursts(rng: np.random.Generator, t: int, rate: float, length: int, gain: float) -> np.ndarray:
    """Amplitude gain ``[t]``: 1, and ``gain`` for ``length`` steps after each burst start."""
    g = np.ones(t)
    for start in np.flatnonzero(rng.random(t) < rate):
        g[start:start + length] = gain
    return g


def simulate_scan(params: SynthParams | dict, index: int, session: int = 0) -> np.ndarray:
    """Raw ROI series of subject ``index``, session ``session``: ``[rois, time]`` float64."""
    params = params if isinstance(params, SynthParams) else SynthParams(**params)
    c = _cohort(params)
    r = network_coupling(params, index, session, c)
    rng = np.random.default_rng([params.seed, index, 3, session])
    who = subject(params, index)
    case = who["diagnosis"] == "Case"
    effects = set(params.dynamic_effects)
    tau = 3.0 * (1 + params.timescale_effect) if case and "timescale" in effects else 3.0
    phi = float(np.exp(-params.tr / tau))
    t = params.n_timepoints
    lag = params.lag_trs if "lag" in effects else 0
    if "dwell" in effects:
        dyn = np.random.default_rng([params.seed, index, 5, session])
        states = _markov_states(dyn, t + lag, params.dwell_trs[int(case)])
        chols = np.stack([np.linalg.cholesky(_nearest_correlation(r + sign * params.state_coupling * c["P_state"])) for sign in (1, -1)])
        z = _ar1(rng, params.n_networks, t + lag, phi, chols, states)
    else:
        z = _ar1(rng, params.n_networks, t + lag, phi, np.linalg.cholesky(r))
    if lag:
        lead, follow = c["lag_pair"][::-1] if case else c["lag_pair"]
        k = params.lag_strength
        z[follow, lag:] = np.sqrt(1 - k**2) * z[follow, lag:] + k * z[lead, :-lag]
        z = z[:, lag:]
    u = _ar1(rng, params.n_rois, t, phi)
    w = c["loadings"][:, None]
    y = w * z[c["nets"]] + np.sqrt(1 - w**2) * u
    if case and "bursts" in effects:
        y = y * _bursts(np.random.default_rng([params.seed, index, 6, session]), t, params.burst_rate, params.burst_trs,
                        params.burst_gain)
    gain = c["site_gain"][who["site"]]
    return c["baseline"][:, None] + (c["amplitude"] * c["baseline"])[:, None] * gain * y


def expected_fc(params: SynthParams, network_r: np.ndarray, cohort: dict | None = None) -> np.ndarray:
    """Expected ROI-level correlation ``[rois, rois]`` for network coupling ``network_r``."""
    c = cohort or _cohort(params)
    w = c["loadings"]
    fc = np.outer(w, w) * network_r[np.ix_(c["nets"], c["nets"])]
    np.fill_diagonal(fc, 1.0)
    return fc


def oracle(params: SynthParams) -> dict:
    """The planted truth: ROI-level effect patterns (d FC / d sex [F - M], d FC / d age_z),
    network-level patterns, network names and the ROI->network map."""
    c = _cohort(params)
    w = np.outer(c["loadings"], c["loadings"])
    lift = lambda p: w * p[np.ix_(c["nets"], c["nets"])]  # noqa: E731
    return {
        "networks": c["names"],
        "roi_networks": c["nets"].tolist(),
        "network_patterns": {"sex": (params.sex_effect * c["P_sex"]).tolist(), "age": (params.age_effect * c["P_age"]).tolist()},
        "roi_patterns": {"sex": params.sex_effect * lift(c["P_sex"]), "age": params.age_effect * lift(c["P_age"])},
        "age_z": {"mean": sum(AGE_RANGE) / 2, "sd": (AGE_RANGE[1] - AGE_RANGE[0]) / np.sqrt(12)},
    }


def oracle_scores(params: SynthParams, fc: np.ndarray) -> dict[str, np.ndarray]:
    """Project FC matrices ``[scans, rois, rois]`` onto the true effect patterns: the oracle's
    linear score per scan for each planted effect (higher = more female / older)."""
    pats = oracle(params)["roi_patterns"]
    iu = np.triu_indices(params.n_rois, 1)
    fc = fc if fc.ndim == 3 else fc[None]
    return {k: fc[:, iu[0], iu[1]] @ p[iu] for k, p in pats.items()}


def cohort_table(params: SynthParams) -> list[dict]:
    """One dict per scan: subject attributes plus the site name, ready to become sources."""
    rows = []
    for i in range(params.subjects):
        s = subject(params, i)
        for ses in range(params.sessions):
            rows.append({**s, "site_name": f"site{s['site']}", "session": f"{ses + 1:02d}" if params.sessions > 1 else None, "session_index": ses})
    return rows


def sources(params: SynthParams) -> list:
    """Ingestion sources for every scan of the cohort (read lazily, one subject per call)."""
    from fmrilm.data.sources import ScanSource, make_scan_id

    labels = roi_labels(params)
    out = []
    for row in cohort_table(params):
        sid = row["subject_id"]
        out.append(ScanSource(
            scan_id=make_scan_id(params.name, sid, row["session"], "rest", None), subject_id=sid,
            dataset=params.name, atlas=f"synthetic-{params.n_rois}", kind="synth",
            uri=f"synth://{params.name}/seed-{params.seed}/sub-{sid}" + (f"/ses-{row['session']}" if row["session"] else ""),
            tr=params.tr, session=row["session"], task="rest", site=row["site_name"], age=row["age"], sex=row["sex"],
            diagnosis=row["diagnosis"],
            options={"params": params.model_dump(mode="json"), "index": int(sid), "session": row["session_index"], "labels": labels},
        ))
    return out


def manifest_extra(params: SynthParams) -> dict:
    """What a synthetic dataset's manifest records: ROI->network map, generator, planted truth."""
    names, nets = network_names(params), roi_networks(params)
    truth = oracle(params)
    return {
        "source": "synthetic",
        "roi_networks": {label: names[n] for label, n in zip(roi_labels(params), nets)},
        "synthetic": {"params": params.model_dump(mode="json"), "network_patterns": truth["network_patterns"], "networks": names},
    }
