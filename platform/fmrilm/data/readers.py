"""Readers: turn one input (a 4D NIfTI, a CIFTI dense time series, an array or AFNI ``.1D`` file,
a synthetic subject) into ``[rois, time]``; discovery of a card's scans, ABIDE Preprocessed
included.

A :class:`ScanSource` describes one scan before it is read: where it is, how to read it, and the
row metadata (ids, site, phenotypes) it will carry. ``sources_from_card`` discovers the sources
of a dataset card; ``read_timeseries`` reads one of them. Both are pure of Ray, so ingestion can
run them inline or as Ray tasks.
"""

from __future__ import annotations

import fnmatch
import io
import os
import re
import tempfile
from dataclasses import dataclass

import numpy as np
import pandas as pd

from fmrilm.errors import UserError
from fmrilm import storage
from fmrilm.data.cards import BIDS_ENTITY_PATTERN, DatasetCard
from fmrilm.data.schema import AGE_RANGE
from fmrilm.data.sources import ScanSource, make_scan_id


class InputError(UserError, ValueError):
    """One input cannot be read; the message names the file and what is wrong."""


# ---------------------------------------------------------------- discovery


def _list_files(root: str, pattern: str) -> list[str]:
    """URIs of files below ``root`` whose relative path matches the glob ``pattern``."""
    import pyarrow.fs as pafs

    loc = storage.resolve(root)
    try:
        infos = loc.fs.get_file_info(pafs.FileSelector(loc.path, recursive=True, allow_not_found=True))
    except OSError as err:
        raise storage.StorageError(f"cannot list {root}: {err}") from err
    out = []
    for info in infos:
        rel = info.path[len(loc.path):].lstrip("/")
        if info.type == pafs.FileType.Directory or not glob_match(rel, pattern):
            continue
        out.append(storage.join(root, rel))  # not a regular file (a device, a broken link): a bad input, reported
    return sorted(out)


def _not_regular(uri: str) -> str | None:
    """Why a matched local path cannot be a scan file (a device, a pipe, a broken link), else None."""
    import stat

    if storage.is_remote(uri):
        return None
    path = storage.resolve(uri).path
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return "a broken link (its target does not exist)"
    return None if stat.S_ISREG(mode) else f"not a regular file ({os.path.realpath(path)} is a device, pipe or socket)"


def glob_match(rel_path: str, pattern: str) -> bool:
    """Match a relative path against a glob where ``*`` stays inside one folder and a ``**``
    segment spans any number of folders."""
    parts, pats = rel_path.split("/"), pattern.strip("/").split("/")

    def match(i: int, j: int) -> bool:
        if j == len(pats):
            return i == len(parts)
        if pats[j] == "**":
            return any(match(k, j + 1) for k in range(i, len(parts) + 1))
        return i < len(parts) and fnmatch.fnmatchcase(parts[i], pats[j]) and match(i + 1, j + 1)

    return match(0, 0)


MAX_CELL_CHARS = 4096  # a phenotype cell longer than this is a broken table, not a value


@dataclass
class Phenotypes:
    """A card's phenotype table, read: ``by_subject`` maps subject id -> {age, sex, diagnosis,
    site, phenotypes}; ``problems`` maps subject id -> what is wrong with its row(s) (bad cells,
    duplicate rows); ``rows`` is the table's row count."""

    by_subject: dict[str, dict]
    problems: dict[str, list[str]]
    rows: int
    file: str | None = None


def load_phenotypes(card: DatasetCard) -> Phenotypes:
    """Read the card's phenotype table. A missing file or a column named in the card but absent
    is an :class:`InputError` for the whole table; a bad cell (age not a number or outside
    0-120 years, an unknown sex code) or a subject with several rows is a problem of that subject
    (its scans are bad inputs, quarantinable), located by file, row and column."""
    pc = card.phenotypes
    if pc is None:
        return Phenotypes({}, {}, 0)
    try:
        raw = storage.read_bytes(storage.resolve(pc.file))
    except FileNotFoundError:
        raise InputError(f"phenotype table {pc.file} does not exist") from None
    sep = "," if pc.file.endswith(".csv") else "\t"
    try:
        df = pd.read_csv(io.BytesIO(raw), sep=sep, dtype=str, keep_default_na=False)
    except (ValueError, pd.errors.ParserError) as err:
        raise InputError(f"phenotype table {pc.file} is not a readable {'CSV' if sep == ',' else 'TSV'} file ({err})") from None
    needed = [pc.subject_column, *pc.columns.values(), *pc.extra]
    missing = [c for c in needed if c not in df.columns]
    if missing:
        raise InputError(
            f"phenotype table {pc.file} has no column(s) {missing} named in the card "
            f"(its columns: {list(df.columns)})"
        )
    out: dict[str, dict] = {}
    problems: dict[str, list[str]] = {}
    first_row: dict[str, int] = {}
    for i, rec in df.iterrows():
        sub = str(rec[pc.subject_column]).strip().removeprefix("sub-")
        line = f"{pc.file} row {i + 2}"  # +1 header, +1 one-based
        if sub in first_row:
            problems.setdefault(sub, []).append(f"{line}: subject {sub!r} also has row {first_row[sub]} (duplicate phenotype rows)")
            continue
        first_row[sub] = i + 2
        huge = [c for c in df.columns if len(str(rec[c])) > MAX_CELL_CHARS]
        if huge:
            problems.setdefault(sub, []).append(f"{line} column(s) {huge[:3]}: over {MAX_CELL_CHARS} characters in one cell "
                                                "(a phenotype is a short value; is the file's separator right?)")
            continue
        entry = {"phenotypes": {c: str(rec[c]) for c in pc.extra if rec[c] != ""}}
        for target, col in pc.columns.items():
            value = str(rec[col]).strip()
            where = f"{line} column {col!r}"
            if value in ("", "n/a", "NA", "nan"):
                entry[target] = None
            elif target == "age":
                try:
                    age = float(value)
                except ValueError:
                    problems.setdefault(sub, []).append(f"{where}: age {value!r} is not a number")
                    continue
                if not (np.isfinite(age) and AGE_RANGE[0] <= age <= AGE_RANGE[1]):
                    problems.setdefault(sub, []).append(f"{where}: age {value} is outside {AGE_RANGE[0]:g}-{AGE_RANGE[1]:g} years")
                    continue
                entry["age"] = age
            elif target == "sex":
                if value not in pc.sex_values:
                    problems.setdefault(sub, []).append(f"{where}: sex {value!r} is not in sex_values {sorted(pc.sex_values)}")
                entry["sex"] = pc.sex_values.get(value)
            elif target == "mean_fd":
                try:
                    fd = float(value)
                except ValueError:
                    problems.setdefault(sub, []).append(f"{where}: mean FD {value!r} is not a number")
                    continue
                if not (np.isfinite(fd) and fd >= 0):
                    problems.setdefault(sub, []).append(f"{where}: mean FD {value} is not a displacement (mm >= 0)")
                    continue
                entry["phenotypes"]["mean_fd"] = f"{fd:.6g}"
            elif target == "diagnosis":
                entry["diagnosis"] = pc.diagnosis_values.get(value, value) if pc.diagnosis_values else value
            else:
                entry[target] = value
        out[sub] = entry
    return Phenotypes(out, problems, int(len(df)), pc.file)


def sources_from_card(card: DatasetCard) -> list[ScanSource]:
    """Discover every scan a card describes (glob + BIDS entities + phenotypes). A file whose
    name does not match the entity pattern, or whose subject's phenotype row is bad, becomes a
    source with ``problem`` set (a bad input, reported or quarantined like an unreadable file)."""
    return discover(card)[0]


def discover(card: DatasetCard) -> tuple[list[ScanSource], dict]:
    """``(sources, phenotype report)``: :func:`sources_from_card`'s sources and how the phenotype
    table matched them (``rows``, ``matched_subjects``, ``unmatched_rows`` count and examples,
    ``scans_without_row``). Raises :class:`InputError` when the card has a phenotype table but
    no row matches any scan's subject (ids spelled differently)."""
    if card.format == "abide_pcp":
        return discover_abide(card)
    files = _list_files(card.root, card.glob)
    if not files:
        raise InputError(f"dataset card {card.name!r}: no file under {card.root} matches {card.glob!r}")
    pheno = load_phenotypes(card)
    entity_re = re.compile(card.entity_pattern)
    labels = atlas_labels(card)
    sources = []
    for uri in files:
        odd = _not_regular(uri) or ("its name has white space, which would cut its scan id short: rename it"
                                    if re.search(r"\s", os.path.basename(uri)) else None)
        if odd:
            sources.append(ScanSource(scan_id=f"{card.name}_file-{os.path.basename(uri)}", subject_id="", dataset=card.name,
                                      atlas=card.atlas.name, kind="array", uri=uri, problem=odd))
            continue
        m = entity_re.search(os.path.basename(uri))
        if (not m or not m.groupdict().get("subject")) and card.entity_pattern != BIDS_ENTITY_PATTERN:
            m = entity_re.search(uri[len(card.root.rstrip("/")) + 1:])  # a layout naming the subject in a folder (HCP: 100307/...)
        if not m or not m.groupdict().get("subject"):
            sources.append(ScanSource(scan_id=f"{card.name}_file-{os.path.basename(uri)}", subject_id="", dataset=card.name,
                                      atlas=card.atlas.name, kind="array", uri=uri,
                                      problem="file name does not match the card's entity_pattern (need at least a subject)"))
            continue
        ent = m.groupdict()
        subject = ent["subject"]
        task = ent.get("task") or card.task
        p = pheno.by_subject.get(subject, {})
        bad = pheno.problems.get(subject)
        sources.append(ScanSource(
            scan_id=make_scan_id(card.name, subject, ent.get("session"), task, ent.get("run")),
            subject_id=subject, dataset=card.name, atlas=card.atlas.name,
            kind=card.format if card.format in ("nifti", "cifti") else "array", uri=uri, tr=card.tr,
            session=ent.get("session"), run=ent.get("run"), task=task,
            site=p.get("site") or card.site, age=p.get("age"), sex=p.get("sex"),
            diagnosis=p.get("diagnosis"), phenotypes=p.get("phenotypes", {}),
            options={
                "labels": labels, "layout": card.arrays.layout, "mat_key": card.arrays.mat_key,
                "header": card.arrays.header, "labels_img": card.atlas.labels_img,
                "maps_img": card.atlas.maps_img, "dlabel": card.atlas.dlabel, "masker": card.masker.model_dump(),
                "confounds": card.confounds.model_dump() if card.confounds else None,
            },
            problem="bad phenotype row: " + "; ".join(bad) if bad else None,
        ))
    return sources, phenotype_report(card, pheno, sources)


NO_FILE = ("", "no_filename")


def discover_abide(card: DatasetCard) -> tuple[list[ScanSource], dict]:
    """The scans of an ABIDE Preprocessed Connectomes card (:class:`~fmrilm.data.cards.AbidePcpCard`):
    one per phenotype row with a file id, its ``.1D`` file built from the layout, its TR from
    ``abide.site_tr``. Rows without a file (``no_filename``) are counted in the report; a file
    missing from the bucket, a site without a TR or a bad phenotype row makes that scan a bad
    input. ROI labels come from the first file's header unless the card names them."""
    a = card.abide
    folder = storage.join(card.root, "Outputs", a.pipeline, a.strategy, a.derivative)
    present = {os.path.basename(u) for u in _list_files(folder, f"*_{a.derivative}.1D")}
    if not present:
        raise InputError(f"dataset card {card.name!r}: no *_{a.derivative}.1D file under {folder} "
                         "(check root, abide.pipeline, abide.strategy and abide.derivative)")
    with_ids = card.model_copy(update={"phenotypes": card.phenotypes.model_copy(update={"extra": [*card.phenotypes.extra, a.file_id_column]})})
    pheno = load_phenotypes(with_ids)
    labels = atlas_labels(card)
    sources, no_file = [], []
    for subject in sorted(set(pheno.by_subject) | set(pheno.problems)):
        p = pheno.by_subject.get(subject, {"phenotypes": {}})
        file_id = p["phenotypes"].pop(a.file_id_column, "").strip()
        if file_id in NO_FILE:
            no_file.append(subject)
            continue
        name = f"{file_id}_{a.derivative}.1D"
        site = p.get("site") or card.site
        problems = list(pheno.problems.get(subject, []))
        if name not in present:
            problems.append(f"{name} is not in {folder} (listed in {card.phenotypes.file} as {a.file_id_column} {file_id!r})")
        if site not in a.site_tr:
            problems.append(f"no TR for site {site!r}: add it to abide.site_tr")
        if labels is None and name in present:
            labels = read_afni_1d(storage.join(folder, name))[1]
        sources.append(ScanSource(
            scan_id=make_scan_id(card.name, subject, None, card.task or "rest", None), subject_id=subject, dataset=card.name,
            atlas=card.atlas.name, kind="array", uri=storage.join(folder, name), tr=a.site_tr.get(site), task=card.task or "rest",
            site=site, age=p.get("age"), sex=p.get("sex"), diagnosis=p.get("diagnosis"), phenotypes=p["phenotypes"],
            options={"labels": labels}, problem="; ".join(problems) or None))
    for source in sources:  # the labels found after the first sources were made
        source.options["labels"] = labels
    report = phenotype_report(card, pheno, sources) | {"no_filename_rows": len(no_file), "no_filename_examples": no_file[:10]}
    return sources, report


def read_afni_1d(uri: str) -> tuple[np.ndarray, list[str] | None]:
    """An AFNI ``.1D`` text file (one row per time point, whitespace-separated; ``#`` lines are
    comments, the first holding the ROI labels as ``#label`` fields) -> ``([rois, time], labels)``."""
    try:
        text = storage.read_bytes(storage.resolve(uri)).decode("utf-8", errors="replace")
    except FileNotFoundError:
        raise InputError(f"{uri}: file does not exist") from None
    header = next((line for line in text.splitlines() if line.startswith("#")), None)
    labels = [t.lstrip("#") for t in header.split()] if header else None
    try:
        arr = np.loadtxt(io.StringIO(text), comments="#", ndmin=2)
    except ValueError as err:
        raise InputError(f"{uri}: unreadable .1D file ({err})") from None
    if labels is not None and len(labels) != arr.shape[1]:
        raise InputError(f"{uri}: its header names {len(labels)} ROIs but its rows have {arr.shape[1]} columns")
    return arr.T, labels


def phenotype_report(card: DatasetCard, pheno: Phenotypes, sources: list[ScanSource]) -> dict:
    """How a phenotype table matched the scans (see :func:`discover`)."""
    if card.phenotypes is None:
        return {}
    subjects = {s.subject_id for s in sources if s.subject_id}
    listed = set(pheno.by_subject) | set(pheno.problems)
    unmatched = sorted(listed - subjects)
    without = sorted({s.scan_id for s in sources if s.subject_id and s.subject_id not in listed})
    if subjects and listed and not (subjects & listed):
        raise InputError(
            f"phenotype table {pheno.file}: no row matches any scan's subject (table ids e.g. {sorted(listed)[:3]}, scan subjects "
            f"e.g. {sorted(subjects)[:3]}): check phenotypes.subject_column and the card's entity_pattern")
    return {"file": pheno.file, "rows": pheno.rows, "matched_subjects": len(subjects & listed),
            "unmatched_rows": len(unmatched), "unmatched_examples": unmatched[:10],
            "scans_without_row": len(without), "scans_without_row_examples": without[:10]}


def atlas_labels(card: DatasetCard) -> list[str] | None:
    """ROI labels from the card (inline list, a one-label-per-line file, or the parcel names
    of its CIFTI dlabel), else None."""
    if card.atlas.labels:
        return list(card.atlas.labels)
    if card.atlas.labels_file:
        text = storage.read_text(storage.resolve(card.atlas.labels_file))
        return [line.strip() for line in text.splitlines() if line.strip()]
    if card.atlas.dlabel:
        with tempfile.TemporaryDirectory() as tmp:
            return [name for _, name in dlabel_parcels(_local_copy(card.atlas.dlabel, tmp), card.atlas.dlabel)[1]]
    return None


# ---------------------------------------------------------------- reading


def _local_copy(uri: str, workdir: str) -> str:
    """A local path for ``uri`` (downloaded into ``workdir`` when it is remote)."""
    if not storage.is_remote(uri):
        return storage.resolve(uri).path
    dest = os.path.join(workdir, os.path.basename(uri))
    with open(dest, "wb") as f:
        f.write(storage.read_bytes(storage.resolve(uri)))
    return dest


def _is_number(text) -> bool:
    try:
        float(str(text))
        return True
    except ValueError:
        return False


def read_array(uri: str, layout: str = "time_by_rois", mat_key: str | None = None, header: bool = False) -> np.ndarray:
    """Read a per-scan array file (``.npy``, ``.csv``, ``.tsv``, ``.txt``, ``.mat``) -> ``[rois, time]``."""
    try:
        raw = storage.read_bytes(storage.resolve(uri))
    except FileNotFoundError:
        raise InputError(f"{uri}: file does not exist") from None
    name = uri.lower()
    try:
        if name.endswith(".npy"):
            arr = np.load(io.BytesIO(raw), allow_pickle=False)
        elif name.endswith((".csv", ".tsv", ".txt")):
            sep = "," if name.endswith(".csv") else "\t" if name.endswith(".tsv") else r"\s+"
            df = pd.read_csv(io.BytesIO(raw), sep=sep, header=0 if header else None)
            if header and all(_is_number(c) for c in df.columns):
                raise InputError(f"{uri}: arrays.header is true but its first row is numbers (a time point, which would be "
                                 "dropped): set arrays.header: false for files without a row of labels")
            non_numeric = [c for c in df.columns if not pd.api.types.is_numeric_dtype(df[c])]
            if non_numeric:
                raise InputError(f"{uri}: column(s) {non_numeric[:5]} are not numeric (wrong dtype; set arrays.header if the first row holds labels)")
            arr = df.to_numpy()
        elif name.endswith(".mat"):
            from scipy.io import loadmat

            mat = loadmat(io.BytesIO(raw))
            keys = [k for k in mat if not k.startswith("__")]
            key = mat_key or (keys[0] if len(keys) == 1 else None)
            if key is None or key not in mat:
                raise InputError(f"{uri}: set arrays.mat_key to one of {keys}")
            arr = np.asarray(mat[key])
        else:
            raise InputError(f"{uri}: unsupported array format (use .npy, .csv, .tsv, .txt or .mat)")
    except InputError:
        raise
    except Exception as err:  # noqa: BLE001 - any parser failure is an unreadable input
        raise InputError(f"{uri}: unreadable ({type(err).__name__}: {err})") from err
    if arr.ndim != 2:
        raise InputError(f"{uri}: expected a 2-D array, got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.number) or np.issubdtype(arr.dtype, np.complexfloating):
        raise InputError(f"{uri}: expected real numbers, got dtype {arr.dtype} (wrong dtype)")
    return arr.T if layout == "time_by_rois" else arr


def read_nifti(source: ScanSource) -> tuple[np.ndarray, float]:
    """Extract ``[rois, time]`` from a 4D NIfTI with a labels or maps atlas; returns (series, TR)."""
    import nibabel as nib
    from nilearn.maskers import NiftiLabelsMasker, NiftiMapsMasker

    opts = source.options
    with tempfile.TemporaryDirectory() as tmp:
        try:
            img_path = _local_copy(source.uri, tmp)
            img = nib.load(img_path)
        except FileNotFoundError:
            raise InputError(f"{source.uri}: file does not exist") from None
        except Exception as err:  # noqa: BLE001
            raise InputError(f"{source.uri}: unreadable NIfTI ({type(err).__name__}: {err})") from err
        if len(img.shape) != 4:
            raise InputError(f"{source.uri}: expected a 4D image, got shape {img.shape}")
        tr = source.tr or float(img.header.get_zooms()[3])
        if not tr or tr <= 0:
            raise InputError(f"{source.uri}: no TR in the header; set tr in the dataset card")
        atlas_uri = opts.get("labels_img") or opts.get("maps_img")
        atlas_img = nib.load(_local_copy(atlas_uri, tmp))
        if atlas_img.shape[:3] != img.shape[:3] or not np.allclose(atlas_img.affine, img.affine, atol=1e-3):
            raise InputError(
                f"{source.uri}: image grid {img.shape[:3]} does not match atlas {atlas_uri} grid "
                f"{atlas_img.shape[:3]} (resample the atlas to the image space first)"
            )
        m = opts.get("masker") or {}
        kwargs = dict(t_r=tr, detrend=m.get("detrend", True), standardize=m.get("standardize"),
                      low_pass=m.get("low_pass"), high_pass=m.get("high_pass"), smoothing_fwhm=m.get("smoothing_fwhm"))
        if opts.get("labels_img"):
            masker = NiftiLabelsMasker(labels_img=atlas_img, **kwargs)
        else:
            masker = NiftiMapsMasker(maps_img=atlas_img, **kwargs)
        confounds = None
        if opts.get("confounds"):
            tsv = confounds_uri(source.uri)
            for part in (tsv, tsv[: -len(".tsv")] + ".json"):  # beside the local image, where nilearn looks
                if storage.is_remote(part) and storage.exists(storage.resolve(part)):
                    _local_copy(part, tmp)
            confounds = _fmriprep_confounds(img_path, opts["confounds"], source.uri)
            fd = mean_framewise_displacement(os.path.join(os.path.dirname(img_path), os.path.basename(tsv)))
            if fd is not None:
                source.phenotypes = {**source.phenotypes, "mean_fd": f"{fd:.6g}"}
        try:
            ts = masker.fit_transform(img, confounds=confounds)
        except Exception as err:  # noqa: BLE001
            raise InputError(f"{source.uri}: ROI extraction failed ({type(err).__name__}: {err})") from err
    return np.asarray(ts, dtype=np.float64).T, tr


def confounds_uri(image_uri: str) -> str:
    """The fMRIPrep confounds table of a preprocessed BOLD image: the image's entities before
    ``_space-``/``_desc-`` + ``_desc-confounds_timeseries.tsv``, in the same folder."""
    folder, name = image_uri.rsplit("/", 1) if "/" in image_uri else (".", image_uri)
    stem = re.split(r"_(?:space|desc|res)-", name, maxsplit=1)[0]
    return f"{folder}/{stem}_desc-confounds_timeseries.tsv"


def mean_framewise_displacement(tsv_path: str) -> float | None:
    """Mean of the ``framewise_displacement`` column of an fMRIPrep confounds TSV (its first
    row is n/a), or ``None`` when the file or column is missing."""
    if not os.path.exists(tsv_path):
        return None
    table = pd.read_csv(tsv_path, sep="\t", na_values=["n/a"])
    if "framewise_displacement" not in table.columns:
        return None
    fd = table["framewise_displacement"].dropna()
    return float(fd.mean()) if len(fd) else None


def _fmriprep_confounds(img_path: str, conf: dict, uri: str):
    from nilearn.interfaces.fmriprep import load_confounds

    try:
        confounds, _ = load_confounds(img_path, strategy=tuple(conf["strategy"]), motion=conf["motion"], wm_csf=conf["wm_csf"])
    except Exception as err:  # noqa: BLE001
        raise InputError(f"{uri}: cannot load fMRIPrep confounds ({type(err).__name__}: {err})") from err
    return confounds


def dlabel_parcels(path: str, uri: str):
    """A CIFTI dense label file: ``(brain model axis, [(key, name)] of its parcels in key
    order (key 0 / ``???``, the unlabelled, left out), labels [grayordinates])``."""
    import nibabel as nib

    try:
        img = nib.load(path)
        label_axis, models = img.header.get_axis(0), img.header.get_axis(1)
        table = label_axis.label[0]
    except Exception as err:  # noqa: BLE001
        raise InputError(f"{uri}: not a CIFTI dense label file (.dlabel.nii) ({type(err).__name__}: {err})") from err
    keys = np.asarray(img.get_fdata()[0]).round().astype(int)
    parcels = [(k, table[k][0]) for k in sorted(table) if k != 0 and table[k][0] != "???" and (keys == k).any()]
    if not parcels:
        raise InputError(f"{uri}: its label table names no parcel with grayordinates")
    return models, parcels, keys


def read_cifti(source: ScanSource) -> tuple[np.ndarray, float]:
    """Parcellate a CIFTI dense time series (``.dtseries.nii``) with the card's ``.dlabel.nii``:
    the mean over each parcel's grayordinates -> ``([rois, time], TR)``; the two files must
    share their grayordinates (brain model axis)."""
    import nibabel as nib

    dlabel = source.options["dlabel"]
    with tempfile.TemporaryDirectory() as tmp:
        try:
            img = nib.load(_local_copy(source.uri, tmp))
            series, models = img.header.get_axis(0), img.header.get_axis(1)
            data = np.asarray(img.get_fdata(), np.float64)  # [time, grayordinates]
        except FileNotFoundError:
            raise InputError(f"{source.uri}: file does not exist") from None
        except Exception as err:  # noqa: BLE001
            raise InputError(f"{source.uri}: not a CIFTI dense time series ({type(err).__name__}: {err})") from err
        label_models, parcels, keys = dlabel_parcels(_local_copy(dlabel, tmp), dlabel)
    if not hasattr(series, "step"):
        raise InputError(f"{source.uri}: its first axis is not a time series (a .dtseries.nii has a series axis)")
    if models != label_models:
        raise InputError(f"{source.uri}: its {len(models)} grayordinates differ from those of {dlabel} ({len(label_models)}): "
                         "use a dlabel defined on the same surface mesh and subcortical volume")
    unit = {"SECOND": 1.0, "MSEC": 1e-3, "USEC": 1e-6}.get(str(series.unit).upper(), 1.0)
    tr = source.tr or float(series.step) * unit
    return np.stack([data[:, keys == k].mean(1) for k, _ in parcels]), tr


def read_timeseries(source: ScanSource) -> tuple[np.ndarray, float]:
    """Read one source into (``[rois, time]`` float64 array, TR seconds)."""
    if source.kind == "nifti":
        return read_nifti(source)
    if source.kind == "cifti":
        return read_cifti(source)
    if source.kind == "array":
        o = source.options
        if source.uri.lower().endswith(".1d"):
            ts, labels = read_afni_1d(source.uri)
            if labels and o.get("labels") and labels != list(o["labels"]):
                raise InputError(f"{source.uri}: the ROI labels of its header differ from the dataset's (e.g. {labels[:3]} vs "
                                 f"{list(o['labels'])[:3]}): another atlas or derivative")
            return ts, float(source.tr)
        ts = read_array(source.uri, o.get("layout", "time_by_rois"), o.get("mat_key"), o.get("header", False))
        if o.get("parcels"):  # a coarser atlas: merged regions of the file's atlas
            from fmrilm.data.parcels import merge_parcels

            ts = merge_parcels(ts, o["parcels"]["groups"], o["parcels"].get("weights"))
        return ts, float(source.tr)
    if source.kind == "synth":
        from fmrilm.data import synth

        return synth.simulate_scan(source.options["params"], source.options["index"], source.options.get("session", 0)), float(source.tr)
    raise InputError(f"{source.uri}: unknown source kind {source.kind!r}")
