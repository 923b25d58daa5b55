"""``fmrilm eval SPEC``: the LM's answers on held-out scans beside baselines on the same scans.

Test groups: ``heldout_subjects`` (scans of the ``test_splits`` of the training datasets) and
``heldout_dataset`` (every scan of ``heldout_datasets``, whose subjects never reach training).
Paradigms of the LM, each on the same test scans:

* ``zero_shot``: the pretrained export (no task training) asked the question;
* ``in_context``: ``in_context_k`` training subjects' scans and answers before the query;
* ``kshot_lora``: the adapters of the kshot stage (:mod:`fmrilm.train.kshot`), each tuned on
  ``k`` training scans per class from the pretrained export, beside FC + linear fitted on the
  same scans;
* ``full``: the instruct stage's export (multi-task LoRA on every training subject);
  with ``shuffles``, asked again with each test scan's codes shuffled over time or over ROIs
  (paradigms ``full_shuffled_time`` / ``full_shuffled_rois``, each with its paired gap to the
  unshuffled answers): a model that reads its codes falls;
* ``arm``: each other instruct export of ``arms`` (another backbone or input mode: the poster's
  fMRI encoder + GPT-2 arm) asked like ``full``;
* ``vlm``: each VLM baseline export (``vlm``, :mod:`fmrilm.eval.vlm`) asked about the same scans
  shown as images. Arms and VLMs get paired gaps to fmrilm's full answers and to the best classical reader.

Classification is constrained scoring over the allowed answers; the age number is generated and
parsed. Baselines (:mod:`fmrilm.eval.baselines`) are fitted on every training subject. Every
metric carries a bootstrap confidence interval over test scans. Writes ``report.json``,
``report.md`` and plots under ``<storage>/<run>/eval/``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from functools import cached_property
from typing import Literal

import numpy as np
import pandas as pd
from pydantic import Field, field_validator, model_validator

from fmrilm import storage
from fmrilm.config import RunLocation, StageSpec
from fmrilm.data.pipeline import DataSpec
from fmrilm.data import splits, table
from fmrilm.data.contract import AtlasMapping
from fmrilm.data.instructions import QUESTIONS, REGRESSION, Labeller, answerable, fewshot_context, fit_labeller, question_prompt
from fmrilm.eval import baselines, classical, metrics
from fmrilm.errors import UserError
from fmrilm.features import dynamics
from fmrilm.eval.probes import answer_states, cv_probe, tokenizer_representations
from fmrilm.eval.report import ARM, SHUFFLED, VLM, answers
from fmrilm.eval.vlm import VLMAnswerer
from fmrilm.artifacts.vlm import export_meta as vlm_export_meta
from fmrilm.artifacts.tokens import ScanBlocks, Shuffle

log = logging.getLogger("fmrilm.eval")
PARADIGMS = ("zero_shot", "in_context", "kshot_lora", "full")
ANSWER_ROOM = 8  # tokens kept free after an evaluation prompt for the scored or generated answer
BY_SITE = ("majority", "mean", "fc_linear", "fc_linear_deconfounded", "descriptors_linear", classical.BEST)  # baselines scored per site


class EvalSpec(StageSpec):
    """Spec of ``jobs/eval.yaml``."""

    kind: Literal["eval"] = "eval"
    model: str | None = Field("./fmrilm-data/runs/instruct/model", description="instruct export (the 'full' paradigm); null: skip it")
    pretrained: str | None = Field(None, description="pretrained export for zero-shot and k-shot (default: the instruct export's base)")
    tokens: str | None = None
    data: DataSpec = DataSpec()
    heldout_datasets: list[str] = Field([], description="datasets evaluated as a whole, never trained on")
    atlas_mapping: AtlasMapping = Field("refuse", description="datasets of an atlas other than the tokenizer's: refuse, or "
                                        "position (as their tokens were made with data.atlas_mapping=position)")
    test_splits: list[str] = ["val", "test"]
    tasks: list[str] = ["sex", "age_bin", "age"]
    paradigms: list[str] = list(PARADIGMS)
    shuffles: list[Shuffle] = Field([], description="the full paradigm asked again with every scan's codes shuffled at test time: "
                                    "time = each ROI's codes permuted over the scan's time steps (their co-occurrence across "
                                    "ROIs broken), rois = the codes of each time step permuted over ROIs (which ROI had which "
                                    "code broken); the scan token's vector is kept")
    in_context_k: int = Field(2, ge=1)
    number_decoding: Literal["expected", "greedy"] = Field(
        "expected", description="the age number: expected = constrained to the whole ages seen in training, the mean under the "
        "model's probabilities; greedy = generated and parsed (its parse rate is reported either way)")
    calibration_scans: int = Field(16, ge=0, description="scans asked each question first, class-balanced, from the training "
                                   "subjects the instruct export held out of tuning (else any training scans): every answer's "
                                   "mean score over them is subtracted before the argmax (0: the raw argmax)")
    vlm: list[str] = Field([], description="VLM baseline exports (jobs/baseline_vlm.yaml), each scored on the same held-out scans "
                           "(paradigm vlm, method vlm:<family>:<run>) beside fmrilm and the classical readers")
    arms: list[str] = Field([], description="other instruct exports asked like the full paradigm on the same scans (paradigm arm, "
                            "method arm:<run>), each calibrated on the training subjects it held out of tuning: e.g. the poster's "
                            "fMRI encoder + GPT-2 arm (jobs/baseline_encoder_lm.yaml, then jobs/instruct.yaml)")
    kshot: str | None = Field("./fmrilm-data/runs/kshot", description="the kshot stage's adapter set (its run folder): "
                              "the kshot_lora paradigm; null: that paradigm is skipped")
    fmri_steps: int | None = Field(None, ge=1, description="time steps of each scan's fMRI block in a prompt "
                                   "(default: what the instruct export was tuned with, else 4)")
    seq_len: int = Field(512, ge=32)
    bootstrap: int = Field(1000, ge=0)
    baselines: bool = True
    classical: bool = Field(True, description="the classical readers beyond FC (pre-whitened FC, timescale, lagged FC, windowed FC, "
                            "amplitude, combined) as baselines, and the best of them per task (needs baselines)")
    probes: bool = Field(True, description="cross-validated linear probes of every representation on the held-out scans "
                         "(FC, scan vector, codes, the LM's answer state): where the signal is lost")
    seed: int = 0
    run: RunLocation = RunLocation(name="eval")

    @field_validator("kshot", mode="before")
    @classmethod
    def _kshot_moved(cls, v):
        if isinstance(v, dict):
            raise ValueError("k-shot LoRA is its own stage now: move kshot.k/seeds/steps/lr/lora into a kshot spec "
                             "(jobs/kshot.yaml) and set kshot to that run's folder (e.g. ./fmrilm-data/runs/kshot)")
        return v

    @field_validator("tasks")
    @classmethod
    def _tasks(cls, v):
        return answerable(v, "eval")

    @field_validator("paradigms")
    @classmethod
    def _paradigms(cls, v):
        bad = sorted(set(v) - set(PARADIGMS))
        if bad or not v:
            raise ValueError(f"unknown or no paradigm(s) {bad}; known: {list(PARADIGMS)}")
        return v

    @model_validator(mode="after")
    def _shuffles_ask_the_full_paradigm(self):
        if self.shuffles and ("full" not in self.paradigms or self.model is None):
            raise ValueError(f"shuffles {self.shuffles} ask the full paradigm again: add full to paradigms and set model")
        return self


# ---------------------------------------------------------------- data


def eval_meta(spec: EvalSpec, scans_with_tokens: set[str], trained: dict[str, dict | None] | None = None) -> pd.DataFrame:
    """The scan index with a ``group`` column: ``train``, ``heldout_subjects``, ``heldout_dataset``
    or ``unused``; only scans with tokens. ``trained`` maps each model (or features build) the
    evaluation reads to its split record: the split is the spec's, else the one the first of
    them was trained with, and no held-out scan may belong to a subject any of them trained on."""
    from fmrilm.data.pipeline import scan_meta

    trained = trained or {}
    policy = splits.inherited(spec.data.split, next((r for r in trained.values() if r and r.get("policy")), None))
    datasets = None if spec.data.datasets is None else sorted(set(spec.data.datasets) | set(spec.heldout_datasets))
    meta = scan_meta(spec.data.root, datasets, policy)
    unknown = sorted(set(spec.heldout_datasets) - set(meta["dataset"]))
    if unknown:
        raise UserError(f"heldout_datasets {unknown} are not under {spec.data.root} (found {sorted(set(meta['dataset']))})")
    meta = meta[meta["scan_id"].isin(scans_with_tokens)].copy()
    held = meta["dataset"].isin(spec.heldout_datasets)
    meta.loc[held, "split"] = "heldout_dataset"  # its subjects are never training subjects, nor in-context examples
    meta["group"] = np.select([held, meta["split"] == "train", meta["split"].isin(spec.test_splits)],
                              ["heldout_dataset", "train", "heldout_subjects"], "unused")
    heldout = splits.subject_keys(meta[meta["group"].isin(["heldout_subjects", "heldout_dataset"])])
    for source, rec in trained.items():
        splits.check_unseen(heldout, rec, "scored as held out", source)
    return meta.sort_values("scan_id").reset_index(drop=True)


def truth(task: str, rows: pd.DataFrame, labeller: Labeller) -> tuple[pd.DataFrame, np.ndarray]:
    """The rows with a known answer and their true answers (class words, or ages as floats)."""
    from fmrilm.data.instructions import is_missing

    if task in REGRESSION:
        y = pd.to_numeric(rows["age"], errors="coerce").to_numpy(float)
    else:
        y = np.array([labeller.label(task, r) for r in rows.itertuples(index=False)], dtype=object)
    known = np.array([not is_missing(v) for v in y], dtype=bool)
    return rows[known], y[known]


# ---------------------------------------------------------------- the LM's answers


class Answerer:
    """Encodes prompts for one model and answers them (constrained scoring / number parsing)."""

    def __init__(self, model, tokenizer, blocks, spec: EvalSpec, descriptions: dict[str, str] | None = None):
        self.model, self.tok, self.blocks, self.spec = model, tokenizer, blocks, spec
        self.descriptions = descriptions or {}

    def prompts(self, texts: list[str]):
        from fmrilm.data.instructions import with_descriptions
        from fmrilm.data.instructions import encode_rows

        rows = pd.DataFrame({"prompt": [with_descriptions(t, self.descriptions) for t in texts], "answer": "", "task": "x"})
        examples, kept = encode_rows(rows, self.blocks, self.tok, self.spec.fmri_steps, self.spec.seq_len - ANSWER_ROOM, with_answer=False)
        if len(kept) != len(texts):
            raise UserError(f"{len(texts) - len(kept)} evaluation prompts do not fit seq_len={self.spec.seq_len}: raise seq_len")
        return examples

    def answer(self, task: str, texts: list[str], labeller: Labeller, fallback: float, reference: list[str] | None = None,
               candidates: np.ndarray | None = None) -> dict:
        """Answers to ``texts``; for a class question calibrated on the ``reference`` prompts (the
        same question about training scans, :func:`fmrilm.eval.scoring.calibrated_choices`); for a
        number decoded as ``spec.number_decoding`` says over ``candidates`` (with the greedy
        answers' parse rate either way)."""
        from fmrilm.eval.scoring import calibrated_choices, expected_numbers, predict_numbers, score_choices

        prompts = self.prompts(texts)
        if task in REGRESSION:
            values, rate = predict_numbers(self.model, prompts, self.tok, fallback)
            if self.spec.number_decoding == "expected" and candidates is not None and len(candidates):
                return {"pred": expected_numbers(self.model, prompts, self.tok, candidates, self.spec.seq_len), "parse_rate": rate,
                        "decoding": "expected"}
            return {"pred": values, "parse_rate": rate, "decoding": "greedy"}
        choices = labeller.choices(task)
        scores = score_choices(self.model, prompts, choices, self.tok, self.spec.seq_len)
        ref = score_choices(self.model, self.prompts(reference), choices, self.tok, self.spec.seq_len) if reference else None
        picked = calibrated_choices(scores, ref)
        return {"pred": np.array([choices[i].strip() for i in picked], dtype=object), "scores": scores,
                "calibrated_on": 0 if ref is None else len(ref)}


def task_prompts(task: str, test: pd.DataFrame, train: pd.DataFrame, labeller: Labeller, k: int, seed: int) -> list[str]:
    """The evaluation prompt of every test scan (the first wording of the question); with ``k``,
    ``k`` label-balanced training examples before it (drawn per scan, seeded)."""
    question = QUESTIONS[task][0]
    rng = np.random.default_rng(seed)
    out = []
    for row in test.itertuples(index=False):
        shots = ""
        if k:
            context = fewshot_context(task, row, train, labeller, k, rng) or []
            for c in context:
                shots += f"{question_prompt(c.scan_id, question)}{labeller.answer(task, c, {}, rng)}\n\n"
        out.append(shots + question_prompt(row.scan_id, question))
    return out


def calibration_rows(task: str, pool: pd.DataFrame, labeller: Labeller, n: int, seed: int) -> pd.DataFrame:
    """Up to ``n`` scans of ``pool`` (seeded, the same number of each class where the pool allows)
    whose answers to a class question calibrate the LM's choice (none for the age number)."""
    if task in REGRESSION or n == 0:
        return pool.iloc[:0]
    known, y = truth(task, pool, labeller)
    classes = sorted(set(y))
    if not classes:
        return known
    per = max(1, n // len(classes))
    return pd.concat([known[y == c].sample(n=min(per, int((y == c).sum())), random_state=seed) for c in classes])


def calibration_pool(spec: EvalSpec, train: pd.DataFrame, instruct_meta: dict) -> tuple[pd.DataFrame, str]:
    """The scans that calibrate answers: the training subjects the instruct export (metadata
    ``instruct_meta``) held out of tuning (its ``validation_subjects``), else (with a warning: the
    model has seen their answers) every training scan; returns ``(scans, which)``."""
    held = set(instruct_meta.get("validation_subjects") or [])
    pool = train[train["subject_id"].isin(held)]
    if len(pool):
        return pool, "validation subjects (held out of instruct tuning)"
    if spec.model and spec.calibration_scans:
        log.warning("the instruct export %s held no training subjects out of tuning: answers are calibrated on scans it was tuned "
                    "on; set validation (e.g. 0.1) in its instruct spec", spec.model)
    return train, "training scans"


# ---------------------------------------------------------------- evaluation


def score(task: str, y_true: np.ndarray, pred: np.ndarray, scores: np.ndarray | None, classes: list[str], n_boot: int, seed: int) -> dict:
    """Metrics and bootstrap CIs of one set of predictions."""
    if task in REGRESSION:
        fn = metrics.regression
        arrays = [y_true.astype(float), np.asarray(pred, float)]
    else:
        def fn(t, p, s=None):
            return metrics.classification(t, p, s, classes)
        arrays = [y_true, pred] + ([scores] if scores is not None else [])
    out = {"n": int(len(y_true)), "metrics": fn(*arrays)}
    if n_boot:
        out["ci"] = metrics.bootstrap(fn, arrays, n=n_boot, seed=seed, strata=None if task in REGRESSION else y_true)
    return out


def check_contract(spec: EvalSpec, contract: dict | None, datasets: set[str], model: str) -> None:
    """Every evaluated dataset checked against the input contract the pretrained export ``model``
    carries from its tokenizer (:func:`fmrilm.data.contract.check_dataset`); exports older than
    contracts are not checked."""
    from fmrilm.data.contract import check_datasets
    from fmrilm.data.table import find_datasets

    manifests = [m for _, m in find_datasets(spec.data.root, datasets)]
    for warning in check_datasets(contract, manifests, f"the pretrained export {model}", spec.atlas_mapping,
                                  (contract or {}).get("target_tr")):
        log.warning(warning)


def check(spec: EvalSpec) -> tuple[EvalSpec, dict, str, dict, dict | None]:
    """Checks before scoring: the exports to score exist (the instruct export and its pretrained
    base, or ``pretrained``), and the k-shot index when ``kshot_lora`` is asked; returns ``(spec
    with fmri_steps resolved, the instruct export's metadata ({} without one), the pretrained
    export's URI and metadata, the k-shot index or None)``, each export read once."""
    from fmrilm.artifacts.lm import export_meta

    if spec.model is None and spec.pretrained is None:
        raise UserError("eval needs model (an instruct export) or pretrained (a pretrain export)")
    instruct_meta = export_meta(spec.model) if spec.model else {}
    pretrained = spec.pretrained or instruct_meta["base_model"]
    if spec.fmri_steps is None:  # ask with the prompts the model was tuned on
        spec = spec.model_copy(update={"fmri_steps": instruct_meta.get("fmri_steps") or 4})
    pretrained_meta = export_meta(pretrained)
    kshot = None
    if "kshot_lora" in spec.paradigms:
        if spec.kshot:
            from fmrilm.artifacts.kshot import read_index

            kshot = read_index(spec.kshot)
            if storage.absolute(kshot["base_model"]).rstrip("/") != storage.absolute(pretrained).rstrip("/"):
                log.warning("the k-shot adapters %s were tuned from %s, not from this evaluation's pretrained export %s: "
                            "their rows compare other models", spec.kshot, kshot["base_model"], pretrained)
        else:
            log.info("kshot is null: the kshot_lora paradigm is skipped")
    return spec, instruct_meta, pretrained, pretrained_meta, kshot


@dataclass
class Evaluation:
    """What scoring every task reads, prepared once by :func:`prepare`: the spec (``fmri_steps``
    resolved), the exports' metadata, the scans' blocks (and their shuffled copies), the scan
    index with its groups, the labeller, the calibration pool, and the baselines' inputs."""

    spec: EvalSpec
    pretrained: str
    instruct_meta: dict
    kshot: dict | None
    blocks: ScanBlocks
    shuffled: dict[str, ScanBlocks]
    meta: pd.DataFrame
    train: pd.DataFrame  # the training scans of meta (in-context examples, calibration, baselines' fit set)
    groups: list[str]
    tasks: list[str]
    labeller: Labeller
    pool: pd.DataFrame
    pool_name: str
    descriptors: pd.DataFrame
    fcs: dict[str, np.ndarray]  # scan_id -> FC on the prompt's time points (the whole scan with the scan token)
    whole: dict[str, np.ndarray]  # scan_id -> FC of the whole scan
    readers: dict[str, dict]  # suffix ("" prompt time points, "_whole_scan") -> reader -> scan_id -> vector
    age_mean: float  # the training scans' mean age: the fallback of an unparsed age answer
    age_values: np.ndarray | None  # the whole ages seen in training: the constrained age answers
    vlms: list = field(default_factory=list)  # fmrilm.eval.vlm.VLMAnswerer of each VLM export
    arms: list = field(default_factory=list)  # Arm of each other instruct export
    models: dict = field(default_factory=dict)

    def model(self, name: str):
        """``(model, tokenizer)`` of ``pretrained`` or ``instruct``, loaded on first use."""
        from fmrilm.artifacts.lm import load_model

        if name not in self.models:
            self.models[name] = load_model(self.pretrained if name == "pretrained" else self.spec.model)[:2]
        return self.models[name]

    @property
    def descriptions(self) -> dict[str, str]:
        """What the instruct export's prompts carry beside each scan: its first caption, or none."""
        return self.described(bool(self.instruct_meta.get("descriptions")))

    def described(self, flag: bool) -> dict[str, str]:
        """Each scan's first caption when a model was tuned with descriptions in its prompts, else none."""
        return self.captions if flag else {}

    @cached_property
    def captions(self) -> dict[str, str]:
        """Each scan's first caption, read once."""
        from fmrilm.features.store import first_captions, read_captions

        return first_captions(read_captions(self.spec.data.root, None))


@dataclass
class Arm:
    """Another instruct export of :attr:`EvalSpec.arms`: its metadata, pretrained base, fMRI blocks
    (in its own vocabulary), the spec as it was tuned (``fmri_steps``), and the training subjects
    it held out of tuning that calibrate its answers."""

    uri: str
    meta: dict
    base: str
    blocks: ScanBlocks
    asked: EvalSpec
    pool: pd.DataFrame | None = None
    pool_name: str = ""
    model: tuple | None = None

    @classmethod
    def read(cls, uri: str, spec: EvalSpec) -> "Arm":
        from fmrilm.artifacts.lm import export_meta, root_export

        meta = export_meta(uri)
        base = root_export(uri)
        asked = spec.model_copy(update={"fmri_steps": meta.get("fmri_steps") or spec.fmri_steps})
        return cls(uri, meta, base, ScanBlocks(base, spec.data.root, spec.data.datasets, None), asked)

    @property
    def name(self) -> str:
        """The method name of its rows: ``arm:<run name>``."""
        from fmrilm.artifacts.lm import run_of

        return ARM + run_of(self.uri)

    def loaded(self) -> tuple:
        """``(model, tokenizer)``, loaded on first use."""
        from fmrilm.artifacts.lm import load_model

        if self.model is None:
            self.model = load_model(self.uri)[:2]
        return self.model


def prepare(spec: EvalSpec) -> Evaluation:
    """Everything before scoring: the checks (:func:`check`, no held-out scan of a subject any
    model trained on, the input contract), the blocks, the groups, and the baselines' inputs."""
    from fmrilm.artifacts.lm import export_meta
    from fmrilm.features.store import features_split, read_descriptors

    spec, instruct_meta, pretrained, pretrained_meta, kshot = check(spec)
    blocks = ScanBlocks(pretrained, spec.data.root, spec.data.datasets, spec.tokens)
    trained = {f"the instruct export {spec.model}": instruct_meta.get("split")} if spec.model else {}
    trained[f"the pretrained export {pretrained}"] = pretrained_meta.get("split")
    if spec.baselines:  # a held-out dataset's own build normalises its descriptors against itself: never its labels
        from fmrilm.data.table import find_datasets

        trained_on = spec.data.datasets or [m["dataset"] for _, m in find_datasets(spec.data.root) if m["dataset"] not in spec.heldout_datasets]
        trained[f"the features build of {spec.data.root} (descriptor baselines)"] = features_split(spec.data.root, trained_on)
    if kshot is not None:
        trained[f"the k-shot adapters {spec.kshot}"] = kshot["split"]
    trained |= {f"the VLM export {uri}": vlm_export_meta(uri).get("split") for uri in spec.vlm}
    arms = [Arm.read(uri, spec) for uri in spec.arms]
    for arm in arms:
        trained |= {f"the instruct export {arm.uri}": arm.meta.get("split"), f"the pretrained export {arm.base}": export_meta(arm.base).get("split")}
    shuffled = {axis: blocks.shuffled(axis, spec.seed) for axis in spec.shuffles}
    meta = eval_meta(spec, set(blocks.codes), trained)
    check_contract(spec, pretrained_meta.get("contract"), set(meta["dataset"]), pretrained)
    train = meta[meta["group"] == "train"]
    groups = [g for g in ("heldout_subjects", "heldout_dataset") if (meta["group"] == g).any()]
    if train.empty or not groups:
        raise UserError(f"eval needs training scans and held-out scans with tokens; found groups {meta['group'].value_counts().to_dict()}")
    labeller = fit_labeller(meta)
    if kshot and (kshot["age_cuts"] != (list(labeller.age_cuts) if labeller.age_cuts else None)):
        raise UserError(f"the k-shot adapters {spec.kshot} were tuned with age bins cut at {kshot['age_cuts']}, this evaluation's "
                        f"training scans cut at {labeller.age_cuts}: run the kshot stage on the same datasets")
    tasks = [t for t in spec.tasks if t in REGRESSION or len(labeller.classes.get(t, [])) >= 2]
    for task in sorted(set(spec.tasks) - set(tasks)):
        log.warning("task %s has fewer than two classes among the training scans: skipped", task)
    pool, pool_name = calibration_pool(spec, train, instruct_meta)
    for arm in arms:
        arm.pool, arm.pool_name = calibration_pool(spec, train, arm.meta)
    # every scan's series read once: the baselines, the probes and the VLMs' images
    needed = spec.baselines or spec.probes or spec.vlm
    series, networks = table.series_of(spec.data.root, meta[meta["group"] != "unused"]["scan_id"]) if needed else ({}, {})
    fcs, whole, readers = baseline_inputs(spec, blocks, series, networks)
    vlms = [VLMAnswerer(uri, series) for uri in spec.vlm]
    ages = pd.to_numeric(train["age"], errors="coerce").dropna()
    age_values = np.arange(int(np.floor(ages.min())), int(np.ceil(ages.max())) + 1) if len(ages) else None
    return Evaluation(spec, pretrained, instruct_meta, kshot, blocks, shuffled, meta, train, groups, tasks, labeller, pool, pool_name,
                      read_descriptors(spec.data.root, None) if spec.baselines else pd.DataFrame(), fcs, whole, readers, float(ages.mean()),
                      age_values, vlms, arms)


def baseline_inputs(spec: EvalSpec, blocks: ScanBlocks, series: dict[str, tuple[np.ndarray, float]],
                    networks: dict[str, list[str] | None]) -> tuple[dict, dict, dict]:
    """``(fcs, whole, readers)`` (see :class:`Evaluation`) of the scans' ``series`` (``scan_id ->
    ([rois, time], TR)``) and their ROIs' ``networks``; empty when neither baselines nor probes are asked."""
    if not (spec.baselines or spec.probes):
        return {}, {}, {}
    seen = blocks.seen_timepoints(spec.fmri_steps)  # what the LM's prompt shows (all of it with the scan token)
    shown = {s: x for s, (x, _) in series.items()} if seen is None else {s: prompt_part(x, tr, seen) for s, (x, tr) in series.items()}
    whole = {s: baselines.fc_matrix(x) for s, (x, _) in series.items()}
    fcs = whole if seen is None else {s: baselines.fc_matrix(x) for s, x in shown.items()}
    readers = {}
    if spec.baselines and spec.classical:
        readers[""] = classical.reader_vectors(shown, networks)
        if seen is not None:
            readers["_whole_scan"] = classical.reader_vectors({s: x for s, (x, _) in series.items()}, networks)
    return fcs, whole, readers


class Recorder:
    """Collects the evaluation's rows: a result per task, group, paradigm and method (scored with
    bootstrap CIs), the same per site, the predictions, and per task and group the answers that
    :func:`paired_gaps` pairs."""

    def __init__(self, spec: EvalSpec):
        self.spec = spec
        self.results: list[dict] = []
        self.by_site: list[dict] = []
        self.predictions: list[dict] = []
        self.said: dict[tuple, tuple[dict, np.ndarray]] = {}  # (paradigm, method, k, seed) -> (row, predictions) of the open task

    def open(self, task: str, group: str, test: pd.DataFrame, y: np.ndarray, classes: list[str]) -> None:
        """Start recording one task on one held-out group's ``test`` scans with true answers ``y``."""
        self.task, self.group, self.test, self.y, self.classes, self.said = task, group, test, y, classes, {}

    def close(self) -> None:
        """The open task's paired gaps."""
        paired_gaps(self.task, self.y, self.said, self.spec)

    def record(self, paradigm: str, method: str, out: dict, k=None, seed=None, extra: dict | None = None) -> None:
        task, y, spec = self.task, self.y, self.spec
        res = score(task, y, out["pred"], out.get("scores"), self.classes, spec.bootstrap, spec.seed)
        if answers(method):  # majority/mean are constant by design
            greedy = out.get("decoding") != "expected"  # a constrained number needs no parsing; its parse rate is reported apart
            res["failures"] = metrics.failures(out["pred"], out.get("parse_rate") if greedy else None,
                                               None if task in REGRESSION else len(set(y)), y if task in REGRESSION else None)
        row = {"task": task, "group": self.group, "paradigm": paradigm, "method": method, "k": k, "seed": seed, **res, **(extra or {})}
        self.results.append(row)
        # the full paradigm and the baselines beside it, scored within each site (the same predictions; not the
        # k-shot paradigm's FC fitted on k scans, which would be a second "fc_linear" row per site)
        if (paradigm == "full" or paradigm == "baseline" and method in BY_SITE) and self.test["site"].nunique() > 1:
            sites = self.test["site"].astype(str).to_numpy()
            for site in sorted(set(sites)):
                at = sites == site
                part = score(task, y[at], np.asarray(out["pred"], dtype=object if task not in REGRESSION else float)[at],
                             None if out.get("scores") is None else np.asarray(out["scores"])[at], self.classes, spec.bootstrap, spec.seed)
                self.by_site.append({"task": task, "group": self.group, "paradigm": paradigm, "method": method, "site": site, **part})
        self.predictions.append({"task": task, "group": self.group, "paradigm": paradigm, "method": method, "k": k, "seed": seed,
                                 "scan_id": list(self.test["scan_id"]), "true": [_plain(v) for v in y],
                                 "pred": [_plain(v) for v in out["pred"]]})
        self.said[(paradigm, method, k, seed)] = (row, out["pred"])


def held_out(ev: Evaluation, task: str, group: str) -> tuple[pd.DataFrame, np.ndarray]:
    """The scans of ``group`` with a known answer to ``task`` (a class the training scans have), and their answers."""
    test, y = truth(task, ev.meta[ev.meta["group"] == group], ev.labeller)
    if task not in REGRESSION:
        keep = np.isin(y, ev.labeller.classes[task])
        test, y = test[keep], y[keep]
    return test, y


def score_task(ev: Evaluation, rec: Recorder, task: str, group: str) -> None:
    """Every paradigm of the LM and every baseline on one task and held-out group, into ``rec``."""
    from fmrilm.artifacts.lm import load_model

    spec, labeller, train = ev.spec, ev.labeller, ev.train
    test, y = held_out(ev, task, group)
    if len(test) == 0:
        return
    rec.open(task, group, test, y, labeller.classes.get(task, []))
    reference = calibration_rows(task, ev.pool, labeller, spec.calibration_scans, spec.seed)
    context_pool = train[~train["scan_id"].isin(reference["scan_id"])]  # a reference scan is never its own example

    def ask(model_name, k_context, seed, asked=spec, described=ev.descriptions, scans=ev.blocks, loaded=None, ref_rows=reference,
            ref_from=ev.pool_name):
        model, tok = loaded or ev.model(model_name)
        ref = task_prompts(task, ref_rows, context_pool, labeller, k_context, seed) if len(ref_rows) else None
        out = Answerer(model, tok, scans, asked, described).answer(task, task_prompts(task, test, train, labeller, k_context, seed),
                                                                    labeller, ev.age_mean, ref, ev.age_values)
        used = {"calibration": {"scans": list(ref_rows["scan_id"]), "from": ref_from}} if ref is not None else {}
        return out, {k: out[k] for k in ("parse_rate", "calibrated_on", "decoding") if k in out} | used

    questions = [("zero_shot", "pretrained", 0, ev.blocks)] if "zero_shot" in spec.paradigms else []
    if "in_context" in spec.paradigms:
        questions.append(("in_context", "instruct" if spec.model else "pretrained", spec.in_context_k, ev.blocks))
    if "full" in spec.paradigms and spec.model:  # shuffled codes calibrated on unshuffled training scans, like the answers they pair with
        questions += [("full", "instruct", 0, ev.blocks)] + [(SHUFFLED + axis, "instruct", 0, scans) for axis, scans in ev.shuffled.items()]
    for paradigm, model_name, k_context, scans in questions:
        out, extra = ask(model_name, k_context, spec.seed, scans=scans)
        rec.record(paradigm, "fmrilm", out, k=k_context or None, extra=extra)
    for entry in (a for a in (ev.kshot or {}).get("adapters", []) if a["task"] == task):
        model, tok, tuned = load_model(entry["model"])
        as_tuned = spec.model_copy(update={"fmri_steps": tuned.get("fmri_steps") or spec.fmri_steps})
        out, extra = ask(None, 0, entry["seed"], as_tuned, ev.described(bool(tuned.get("descriptions"))), loaded=(model, tok))
        k, seed, shots = entry["k"], entry["seed"], {"train_rows": entry["train_rows"]}
        rec.record("kshot_lora", "fmrilm", out, k=k, seed=seed, extra=shots | extra)
        if spec.baselines:  # FC + linear fitted on the same k scans per class
            few = baseline_predictions(task, train[train["scan_id"].isin(entry["scan_ids"])], test, labeller, pd.DataFrame(), ev.fcs, spec)
            if "fc_linear" in few:
                rec.record("kshot_lora", "fc_linear", few["fc_linear"], k=k, seed=seed, extra=shots)
    for arm in ev.arms:
        rows = calibration_rows(task, arm.pool, labeller, spec.calibration_scans, spec.seed)
        out, extra = ask(None, 0, spec.seed, arm.asked, ev.described(bool(arm.meta.get("descriptions"))), arm.blocks, arm.loaded(),
                         rows, arm.pool_name)
        rec.record("arm", arm.name, out, extra=extra | {"model": arm.uri})
    for vlm in (v for v in ev.vlms if v.knows(task)):
        out = vlm.answer(task, test, labeller, ev.age_mean)
        rec.record("vlm", vlm.name, out, extra={"model": vlm.uri} | {k: out[k] for k in ("parse_rate", "decoding") if k in out})
    if spec.baselines:
        for method, out in baseline_predictions(task, train, test, labeller, ev.descriptors, ev.fcs, spec, ev.whole, ev.readers).items():
            rec.record("baseline", method, out, extra={k: out[k] for k in ("reader", "cv_score") if out.get(k) is not None})
    rec.close()


def probe_rows(ev: Evaluation, task: str, group: str) -> list[dict]:
    """The linear probes of one task and held-out group (:func:`probe_table`), the LMs' answer states among them."""
    test, y = truth(task, ev.meta[ev.meta["group"] == group], ev.labeller)

    def states(name):
        model, tok = ev.model(name)
        prompts = Answerer(model, tok, ev.blocks, ev.spec, ev.descriptions).prompts(task_prompts(task, test, ev.train, ev.labeller, 0,
                                                                                                 ev.spec.seed))
        return answer_states(model, prompts)

    lms = ["pretrained"] + (["instruct"] if ev.spec.model else [])
    return probe_table(task, group, test, y, ev.blocks, ev.fcs, ev.whole, {n: (lambda n=n: states(n)) for n in lms})


def run(spec: EvalSpec) -> dict:
    """Evaluate every task x paradigm and the baselines; write the report; return it."""
    from rich.progress import track

    from fmrilm.eval.report import write_report

    ev = prepare(spec)
    rec = Recorder(ev.spec)
    plan = [(task, group) for task in ev.tasks for group in ev.groups]
    for task, group in track(plan, description="evaluating"):
        score_task(ev, rec, task, group)
    probes = [row for task, group in track(plan, description="probing") for row in probe_rows(ev, task, group)] if spec.probes else []
    report = {"spec": ev.spec.model_dump(mode="json"), "pretrained": ev.pretrained, "results": rec.results,
              "descriptions": bool(ev.descriptions), "probes": probes,
              "groups": {g: int((ev.meta["group"] == g).sum()) for g in ("train", *ev.groups)}, "classes": ev.labeller.classes,
              "age_cuts": ev.labeller.age_cuts, "input_warnings": tokens_warnings(ev.blocks.tokens_uri), "by_site": rec.by_site}
    report["files"] = write_report(report, rec.predictions, storage.join(spec.run.storage, spec.run.name, "eval"))
    update_card(spec.model or ev.pretrained, report)
    return report


def tokens_warnings(tokens_uri: str) -> list[str]:
    """What the tokenizer's input contract let through when the tokens table was made (mapped
    atlases, distribution shifts), from its ``manifest.json``; empty for older tables."""
    import json

    loc = storage.resolve(tokens_uri).join("manifest.json")
    return json.loads(storage.read_text(loc)).get("input_warnings", []) if storage.exists(loc) else []


def update_card(model: str, report: dict) -> None:
    """Rewrite the model card (``README.md``) of the evaluated export ``model`` with the report's
    held-out figures; an export that cannot be written (a read-only bucket) keeps its card."""
    from fmrilm.model_card import lm_card, write_card
    from fmrilm.artifacts.lm import export_meta

    try:
        write_card(model, lm_card(export_meta(model), model, report, report["files"]["report.md"]))
    except (OSError, PermissionError) as err:
        log.warning("the model card of %s was not updated (%s); the figures are in %s", model, err, report["files"]["report.md"])


def probe_table(task: str, group: str, test: pd.DataFrame, y: np.ndarray, blocks, fcs: dict, whole: dict, lm_states: dict) -> list[dict]:
    """Probe rows of one task and test group (:mod:`fmrilm.eval.probes`): FC (prompt time points,
    whole scan), the tokenizer's outputs (:func:`fmrilm.eval.probes.tokenizer_representations`), and
    ``lm_states`` (name -> a function giving the answer states of the test scans)."""

    ids = list(test["scan_id"])
    reps = {}
    if fcs and len({fcs[s].shape for s in ids}) == 1:
        reps["fc (prompt time points)"] = lambda: np.stack([baselines.upper(fcs[s]) for s in ids])
    if whole and len({whole[s].shape for s in ids}) == 1:
        reps["fc (whole scan)"] = lambda: np.stack([baselines.upper(whole[s]) for s in ids])
    reps |= {f"tokenizer: {name}": fn for name, fn in tokenizer_representations(ids, blocks.codes, blocks.feats, blocks.decoder,
                                                                                   blocks.vectors).items()}
    for name, fn in lm_states.items():
        reps[f"LM answer state: {name}"] = fn
    rows = []
    for name, fn in reps.items():
        rows.append({"task": task, "group": group, "representation": name, "n": int(len(ids)),
                     "metrics": cv_probe(fn(), y, task in REGRESSION)})
    return rows


def _plain(v):
    return float(v) if isinstance(v, (float, np.floating)) else v


def baseline_predictions(task: str, train: pd.DataFrame, test: pd.DataFrame, labeller: Labeller, descriptors: pd.DataFrame,
                         fcs: dict[str, np.ndarray], spec: EvalSpec, whole: dict[str, np.ndarray] | None = None,
                         readers: dict[str, dict] | None = None) -> dict[str, dict]:
    """Predictions of every baseline that applies (see :mod:`fmrilm.eval.baselines`); ``fcs``
    maps scan_id to its FC matrix on the time points the LM's prompt shows (``fc_linear``),
    ``whole`` to the whole scan's (``fc_linear_whole_scan``), ``readers`` a method suffix ("" for
    the prompt's time points, "_whole_scan") to the classical readers' vectors
    (:func:`fmrilm.eval.classical.reader_vectors`); with them, ``best_classical<suffix>`` is the
    reader (FC included) with the best inner-CV score on the training scans."""
    tr, y_tr = truth(task, train, labeller)
    classes = labeller.classes.get(task, [])
    out: dict[str, dict] = {}
    if task in REGRESSION:
        out["mean"] = {"pred": np.full(len(test), float(np.mean(y_tr.astype(float))))}
    else:
        pred, scores = baselines.majority(y_tr, len(test), classes)
        out["majority"] = {"pred": pred, "scores": scores}
    scans = pd.concat([tr, test])["scan_id"]
    features = {}
    for name, mats in (("fc_linear", fcs), ("fc_linear_whole_scan", whole or {})):
        if mats and len({mats[s].shape for s in scans}) == 1:
            features[name] = {s: baselines.upper(mats[s]) for s in scans}
        elif mats:
            log.warning("%s baseline skipped: the scans have different ROI counts", name)
    if not descriptors.empty:
        d = descriptors.set_index("scan_id")
        if set(scans) <= set(d.index):
            features["descriptors_linear"] = {s: d.loc[s].to_numpy(float) for s in scans}
    fd_tr, fd_te = mean_fd(tr), mean_fd(test)
    if "fc_linear" in features and (tr["site"].nunique() > 1 or any(v is not None for v in fd_tr)):
        c_tr = baselines.confounds(list(tr["site"]), fd_tr, list(tr["site"]), fd_tr)
        c_te = baselines.confounds(list(test["site"]), fd_te, list(tr["site"]), fd_tr)
        x_tr, x_te = baselines.deconfound(np.stack([features["fc_linear"][s] for s in tr["scan_id"]]), c_tr,
                                          np.stack([features["fc_linear"][s] for s in test["scan_id"]]), c_te)
        features["fc_linear_deconfounded"] = dict(zip(list(tr["scan_id"]) + list(test["scan_id"]), [*x_tr, *x_te]))
    for name, feats in features.items():
        x_tr = np.stack([feats[s] for s in tr["scan_id"]])
        x_te = np.stack([feats[s] for s in test["scan_id"]])
        if task in REGRESSION:
            out[name] = baselines.fit_regressor(x_tr, y_tr.astype(float), x_te)
        elif len(set(y_tr)) >= 2:
            out[name] = baselines.fit_classifier(x_tr, y_tr, x_te, classes, spec.seed)
    for suffix, vectors in (readers or {}).items():
        out |= classical.fit_readers(vectors, list(tr["scan_id"]), y_tr, list(test["scan_id"]), classes, task in REGRESSION, spec.seed, suffix)
        best = classical.best_of({m: o for m, o in out.items() if m in {f"{r}_linear{suffix}" for r in dynamics.READERS}})
        if best is not None:
            out[f"{classical.BEST}{suffix}"] = best[1] | {"reader": best[0]}
    planted = _planted_pattern(task, tr, y_tr, test, whole or fcs, spec, labeller)
    if planted is not None:
        out["planted_pattern"] = planted
    return out


def mean_fd(scans: pd.DataFrame) -> list[float | None]:
    """Each scan's mean framewise displacement (mm) from its phenotypes map, ``None`` where unrecorded."""
    out = []
    for p in scans["phenotypes"] if "phenotypes" in scans else [None] * len(scans):
        value = dict(p or []).get("mean_fd")
        out.append(None if value is None else float(value))
    return out


def prompt_part(x: np.ndarray, tr: float, seen: dict) -> np.ndarray:
    """The time points of ``x [rois, time]`` an evaluation prompt shows the LM (resampled as the
    tokenizer was trained; :meth:`fmrilm.artifacts.tokens.ScanBlocks.seen_timepoints`)."""
    from fmrilm.data.signal import resample

    return (resample(x, tr, seen["target_tr"]) if seen["target_tr"] else x)[:, : seen["timepoints"]]


def paired_gaps(task: str, y: np.ndarray, said: dict[tuple, tuple[dict, np.ndarray]], spec: EvalSpec) -> None:
    """Each LM result of one task and group gets ``vs``: its paired gap to ``best_classical``
    and to ``fc_linear`` on the same scans (:func:`fmrilm.eval.metrics.compare`; k-shot rows
    against FC + linear on the same k scans per class; shuffled-code rows also against the
    unshuffled ``full`` answers; a VLM's rows also against fmrilm's ``full`` answers)."""
    for (paradigm, method, k, seed), (row, pred) in said.items():
        if not answers(method):
            continue
        bases = ({"fc_linear": (paradigm, "fc_linear", k, seed)} if paradigm == "kshot_lora" else
                 {classical.BEST: ("baseline", classical.BEST, None, None), "fc_linear": ("baseline", "fc_linear", None, None)})
        if paradigm.startswith(SHUFFLED) or method.startswith((VLM, ARM)):
            bases["full"] = ("full", "fmrilm", None, None)
        row["vs"] = {}
        for name, key in bases.items():
            if key in said:
                base_row, base_pred = said[key]
                gap = metrics.compare(y, pred, base_pred, task in REGRESSION, spec.bootstrap, spec.seed)
                row["vs"][name] = gap | ({"reader": base_row["reader"]} if base_row.get("reader") else {})


def _planted_pattern(task: str, tr: pd.DataFrame, y_tr: np.ndarray, test: pd.DataFrame, fcs: dict[str, np.ndarray], spec: EvalSpec,
            labeller: Labeller) -> dict | None:
    """The synthetic generator's planted effect pattern read off each scan's FC, calibrated on the
    training scans (one dataset only). Not an upper bound: the generator's site effect and subject
    noise are not in it, so a model may beat it."""
    effect = {"sex": "sex", "age": "age", "age_bin": "age"}.get(task)
    names = set(tr["dataset"]) | set(test["dataset"])
    if effect is None or len(names) != 1 or not fcs:
        return None
    manifest = next((m for _, m in table.find_datasets(spec.data.root) if m["dataset"] in names), None)
    params = (manifest or {}).get("synthetic", {}).get("params")
    if params is None:
        return None
    s_tr = baselines.oracle_scores(params, np.stack([fcs[s] for s in tr["scan_id"]]))[effect][:, None]
    s_te = baselines.oracle_scores(params, np.stack([fcs[s] for s in test["scan_id"]]))[effect][:, None]
    classes = labeller.classes.get(task, [])
    if task == "age":
        return {"pred": baselines.linear_regressor(s_tr, y_tr.astype(float), s_te)}
    if task == "age_bin":
        ages = pd.to_numeric(tr["age"], errors="coerce").to_numpy(float)
        pred_age = baselines.linear_regressor(s_tr, ages, s_te)
        pred = np.array([classes[int(np.searchsorted(labeller.age_cuts, a, side="right"))] for a in pred_age], dtype=object)
        return {"pred": pred}
    pred, scores = baselines.linear_classifier(s_tr, y_tr, s_te, classes, spec.seed)
    return {"pred": pred, "scores": scores}


def summary(report: dict) -> list[str]:
    """Lines a person reads after :func:`run`; the first is the headline (where the report went), then
    a Markdown table per held-out group."""
    from fmrilm.eval.report import group_tables

    return [f"report {report['files']['report.md']}", *group_tables(report)]
