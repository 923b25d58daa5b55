"""Dataset cards: where a cohort's derivatives live and how to read them (``datasets/*.yaml``).

A card names the input format (4D NIfTI derivatives or per-scan ROI arrays), a glob below its
root, how BIDS entities map to subject/session/run/task, the atlas (labels image, probabilistic
maps image or just ROI labels for arrays), the TR, optional fMRIPrep confounds, the phenotype
table and how its columns map to ``age``/``sex``/``diagnosis``, and the split policy.
Relative paths in a card are relative to the card's own folder.
"""

from __future__ import annotations

import os
from typing import Literal

from pydantic import Field, model_validator

from fmrilm import config, storage
from fmrilm.config import Strict
from fmrilm.data.splits import SplitPolicy

BIDS_ENTITY_PATTERN = (
    r"sub-(?P<subject>[A-Za-z0-9]+)(?:_ses-(?P<session>[A-Za-z0-9]+))?"
    r"(?:_task-(?P<task>[A-Za-z0-9]+))?(?:_acq-[A-Za-z0-9]+)?(?:_run-(?P<run>[A-Za-z0-9]+))?"
)


class AtlasCard(Strict):
    """The parcellation. For NIfTI input give ``labels_img`` (hard labels, NiftiLabelsMasker) or
    ``maps_img`` (probabilistic, NiftiMapsMasker); ``labels`` or ``labels_file`` name the ROIs."""

    name: str
    labels_img: str | None = None
    maps_img: str | None = None
    dlabel: str | None = Field(None, description="CIFTI dense label file (.dlabel.nii) parcellating .dtseries.nii grayordinates")
    labels: list[str] | None = None
    labels_file: str | None = Field(None, description="text file, one ROI label per line")
    networks: dict[str, str] | None = Field(None, description="ROI label -> network name")

    @model_validator(mode="after")
    def _one_image(self):
        if self.labels_img and self.maps_img:
            raise ValueError("give either labels_img or maps_img, not both")
        return self


class MaskerCard(Strict):
    """Signal clean-up applied by the nilearn masker while extracting ROI series."""

    detrend: bool = True
    standardize: Literal["zscore_sample", "zscore", "psc"] | None = Field(
        None, description="per-ROI standardisation by the masker (fmrilm scales robustly later)")
    low_pass: float | None = None
    high_pass: float | None = None
    smoothing_fwhm: float | None = None


class ConfoundsCard(Strict):
    """fMRIPrep confounds, loaded with nilearn's ``load_confounds`` beside each image."""

    strategy: list[str] = ["motion", "wm_csf", "high_pass"]
    motion: Literal["basic", "power2", "derivatives", "full"] = "basic"
    wm_csf: Literal["basic", "power2", "derivatives", "full"] = "basic"


class ArraysCard(Strict):
    """Per-scan arrays: ``.npy``, ``.csv``/``.tsv`` (optional header row of ROI labels), ``.mat``."""

    layout: Literal["time_by_rois", "rois_by_time"] = "time_by_rois"
    mat_key: str | None = None
    header: bool = Field(False, description="csv/tsv: first row holds ROI labels")


class PhenotypeCard(Strict):
    """The phenotype table and how its columns map onto the scan table."""

    file: str
    subject_column: str = "participant_id"
    columns: dict[Literal["age", "sex", "diagnosis", "site", "mean_fd"], str] = Field(
        {}, description="scan-table field -> column; mean_fd (head motion, mm) is kept in the phenotypes map")
    sex_values: dict[str, Literal["M", "F"]] = {"M": "M", "F": "F", "male": "M", "female": "F", "1": "M", "2": "F"}
    diagnosis_values: dict[str, str] | None = None
    extra: list[str] = Field([], description="further columns kept in the phenotypes map")


ABIDE_PIPELINES = Literal["cpac", "ccs", "dparsf", "niak"]
ABIDE_STRATEGIES = Literal["filt_global", "filt_noglobal", "nofilt_global", "nofilt_noglobal"]


class AbidePcpCard(Strict):
    """The ABIDE Preprocessed Connectomes layout: ``<root>/Outputs/<pipeline>/<strategy>/<derivative>/
    <FILE_ID>_<derivative>.1D`` per scan (AFNI text, one row per time point, a ``#`` header of ROI
    labels), keyed by the phenotype table's ``FILE_ID`` (``no_filename`` where a subject was not
    preprocessed). The table lists no TR, so it comes from ``site_tr`` by the site column."""

    pipeline: ABIDE_PIPELINES = "cpac"
    strategy: ABIDE_STRATEGIES = "filt_noglobal"
    derivative: str = Field("rois_cc200", pattern=r"^rois_[A-Za-z0-9]+$", description="ROI time series: rois_cc200, rois_aal, rois_ho...")
    file_id_column: str = "FILE_ID"
    site_tr: dict[str, float] = Field(description="site -> TR in seconds (the phenotype table's site column)")


class MotionCard(Strict):
    """Head-motion censoring at ingest, on each scan's mean framewise displacement (from the
    phenotype table's ``mean_fd`` column or the fMRIPrep confounds)."""

    max_mean_fd: float | None = Field(None, gt=0, description="mm; scans above it are left out and counted in the manifest")


class StorageCard(Strict):
    """How to reach the card's ``s3://`` locations: unsigned (a public bucket; credentials in the
    environment are never sent) and/or through another S3 endpoint than ``AWS_ENDPOINT_URL``."""

    anonymous: bool = Field(False, description="unsigned requests (public buckets such as fcp-indi or openneuro)")
    endpoint: str | None = Field(None, description="S3 endpoint URL of this card's bucket(s) (default: AWS_ENDPOINT_URL or AWS)")


class DatasetCard(Strict):
    """Everything ingestion needs to turn one cohort's derivatives into a scan table."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    format: Literal["nifti", "cifti", "arrays", "abide_pcp"]
    root: str
    glob: str | None = Field(None, description="files below root (nifti, arrays); abide_pcp builds its paths")
    entity_pattern: str = Field(BIDS_ENTITY_PATTERN, description="regex with named groups subject (required), session, task, run; "
                                "matched against the file name, else (a pattern of your own) its path below root; BIDS names carry "
                                "every entity in the file name")
    site: str | None = None
    task: str | None = None
    tr: float | None = Field(None, gt=0, description="seconds; NIfTI: read from the header when unset")
    atlas: AtlasCard
    masker: MaskerCard = MaskerCard()
    confounds: ConfoundsCard | None = None
    arrays: ArraysCard = ArraysCard()
    phenotypes: PhenotypeCard | None = None
    split: SplitPolicy = SplitPolicy()
    storage: StorageCard = StorageCard()
    motion: MotionCard = MotionCard()
    abide: AbidePcpCard | None = None

    @model_validator(mode="after")
    def _format_needs(self):
        if self.format == "abide_pcp":
            if self.abide is None or self.phenotypes is None:
                raise ValueError("format 'abide_pcp' needs an abide section (pipeline, strategy, derivative, site_tr) and phenotypes")
            return self
        if not self.glob:
            raise ValueError(f"format {self.format!r} needs glob (the files below root)")
        if self.format == "cifti" and not self.atlas.dlabel:
            raise ValueError("format 'cifti' needs atlas.dlabel (a .dlabel.nii on the images' grayordinates)")
        if self.format == "nifti" and not (self.atlas.labels_img or self.atlas.maps_img):
            raise ValueError("format 'nifti' needs atlas.labels_img or atlas.maps_img")
        if self.format == "arrays" and self.tr is None:
            raise ValueError("format 'arrays' needs tr (arrays carry no header)")
        return self


def _anchor(path: str | None, base: str) -> str | None:
    if path is None or storage.is_remote(path) or path.startswith("file://") or os.path.isabs(path):
        return path
    return storage.join(base, path)


def load_card(uri: str, overrides: list[str] | None = None) -> DatasetCard:
    """Load a dataset card; relative paths in it are made relative to the card's folder."""
    card = config.load(DatasetCard, uri, overrides)
    base = uri.rsplit("/", 1)[0] if "/" in uri else "."
    card.root = _anchor(card.root, base)
    for obj, attrs in ((card.atlas, ("labels_img", "maps_img", "labels_file", "dlabel")), (card.phenotypes, ("file",)), (card.split, ("file",))):
        for attr in attrs if obj is not None else ():
            setattr(obj, attr, _anchor(getattr(obj, attr), base))
    if card.storage.anonymous or card.storage.endpoint:  # every s3:// location the card names, the same way
        for where in (card.root, card.atlas.labels_img, card.atlas.maps_img, card.atlas.labels_file, card.atlas.dlabel,
                      card.phenotypes.file if card.phenotypes else None, card.split.file):
            if where:
                storage.configure_bucket(where, card.storage.anonymous, card.storage.endpoint)
    return card
