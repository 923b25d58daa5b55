"""Stage-3 instructions: question/answer rows about scans, built from phenotypes and captions.

A row of the ``instructions`` table is ``scan_id, split, task, paradigm,
prompt, answer, choices, target, context`` where ``prompt`` is text with ``<scan:SCAN_ID>``
placeholders that :func:`encode` replaces with that scan's fMRI block (``<fmri> codes </fmri>``),
so the table stays readable and independent of the tokenizer. Prompts follow fMRI-LM::

    <scan:ID>{description?}### Question: {question}
    ### Answer:{answer}

where the optional description (:func:`with_descriptions`, a caption of the scan's imaging
descriptors) is its own paradigm of the stages that use it, never mixed into the others.

Tasks: ``sex`` (`` Male``/`` Female``), ``age_bin`` (`` lower``/`` mean``/`` higher``, tertiles
of the training subjects' ages), ``age`` (the number, regression), ``diagnosis`` and ``site`` /
``dataset`` (the values seen in training), ``description`` (a caption; open answer).

Paradigms: ``single`` (one question), ``multi`` (several questions about one scan; earlier
answers are context, the last one is the target), ``fewshot`` (``k`` other *training* subjects'
scans with their answers before the query; label-balanced for classification, no cap at one
per class). Every question is drawn from several paraphrases with a seeded generator. Only
training-split scans ever appear as in-context examples, whatever the query's split.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

import numpy as np
import pandas as pd
from pydantic import Field, field_validator

from fmrilm.config import Strict

log = logging.getLogger("fmrilm.instructions")

SCAN = re.compile(r"<scan:([^>]+)>")
ANSWER_CUE = "### Answer:"
QUESTIONS = {
    "sex": ["What is the sex of this participant?", "Is this scan from a male or a female participant?",
            "Which sex does this brain scan belong to?", "Classify the participant's sex from this scan.",
            "Tell me the biological sex of the person scanned.", "Was this scan acquired from a man or a woman?"],
    "age_bin": ["Is this participant's age lower than, near or higher than the cohort mean?",
                "Compared with the cohort, is this person younger, average or older? Answer lower, mean or higher.",
                "Which age tertile of the cohort does this scan come from: lower, mean or higher?",
                "Estimate the age group of this participant relative to the cohort (lower, mean, higher)."],
    "age": ["How old is this participant, in years?", "Estimate the age of the person scanned.",
            "What is the participant's age?", "Give the age in years of this participant."],
    "diagnosis": ["What is this participant's diagnosis?", "Which diagnostic group does this scan belong to?",
                  "Classify the clinical group of this participant.", "Is this participant a control or a patient, and which diagnosis?"],
    "site": ["At which site was this scan acquired?", "Which scanner site does this scan come from?",
             "Name the acquisition site of this scan."],
    "dataset": ["Which dataset does this scan come from?", "Name the study this scan belongs to.",
                "From which cohort is this brain scan?"],
    "description": ["Describe this brain's functional connectivity.", "What stands out in this resting-state scan?",
                    "Summarise the functional organisation of this scan.", "Give a short description of this fMRI scan."],
}
CLASSIFICATION = ("sex", "age_bin", "diagnosis", "site", "dataset")
REGRESSION = ("age",)
OPEN = ("description",)
TASKS = (*CLASSIFICATION, *REGRESSION, *OPEN)


def answerable(tasks: list[str], what: str) -> list[str]:
    """``tasks`` if every one is a classification or regression task (a spec validator's check;
    ``what`` names the spec in the message), else ValueError."""
    bad = sorted(set(tasks) - set(CLASSIFICATION) - set(REGRESSION))
    if bad or not tasks:
        raise ValueError(f"unknown or no {what} task(s) {bad}; known: {list(CLASSIFICATION) + list(REGRESSION)}")
    return tasks
SEX_WORDS = {"M": "Male", "F": "Female"}
AGE_BINS = ("lower", "mean", "higher")


class InstructionSpec(Strict):
    """Which instructions to build (the ``instructions`` block of ``jobs/instruct.yaml``)."""

    tasks: dict[str, float] = Field({"sex": 1.0, "age_bin": 1.0, "age": 0.5, "description": 0.5},
                                    description=f"task -> mixing weight; tasks: {', '.join(TASKS)}")
    paradigms: list[str] = Field(["single", "multi", "fewshot"], description="single | multi | fewshot")
    fewshot_k: int = Field(2, ge=1, description="in-context examples of the fewshot paradigm")
    paraphrases: bool = Field(True, description="draw each question from its paraphrases (else the first wording)")
    per_scan: int = Field(1, ge=1, description="rows per scan, task and paradigm (different paraphrases/contexts)")
    seed: int = 0

    @field_validator("tasks")
    @classmethod
    def _known_tasks(cls, v):
        bad = sorted(set(v) - set(TASKS))
        if bad:
            raise ValueError(f"unknown task(s) {bad}; known: {list(TASKS)}")
        if not v or not any(w > 0 for w in v.values()):
            raise ValueError("instructions.tasks needs at least one task with a positive weight")
        return v

    @field_validator("paradigms")
    @classmethod
    def _known_paradigms(cls, v):
        bad = sorted(set(v) - {"single", "multi", "fewshot"})
        if bad or not v:
            raise ValueError(f"unknown or no paradigm(s) {bad}; known: single, multi, fewshot")
        return v


@dataclass
class Labeller:
    """Answers for every task, fitted on the training split only (age tertiles, class lists)."""

    age_cuts: tuple[float, float] | None
    classes: dict[str, list[str]]

    def answer(self, task: str, row, captions: dict[str, list[str]], rng: np.random.Generator) -> str | None:
        """The answer text (leading space) of ``task`` for a scan row, or ``None`` if unknown."""
        if task == "description":
            caps = captions.get(row.scan_id) or []
            return " " + caps[int(rng.integers(len(caps)))] if caps else None
        if task == "age":
            return None if is_missing(row.age) else f" {int(round(float(row.age)))}"
        label = self.label(task, row)
        return None if label is None else " " + label

    def label(self, task: str, row) -> str | None:
        """The class word of a classification task (no leading space), or ``None``."""
        if task == "sex":
            return SEX_WORDS.get(row.sex) if isinstance(row.sex, str) else None
        if task == "age_bin":
            if is_missing(row.age) or self.age_cuts is None:
                return None
            return AGE_BINS[int(np.searchsorted(self.age_cuts, float(row.age), side="right"))]
        value = getattr(row, task, None)
        if is_missing(value):
            return None
        word = str(value).strip().capitalize()
        return word if word in self.classes.get(task, []) else None

    def choices(self, task: str) -> list[str]:
        """Allowed answers (leading space) of a classification task."""
        return [" " + c for c in self.classes[task]]


def is_missing(v) -> bool:
    return v is None or (isinstance(v, float) and np.isnan(v))


def fit_labeller(meta: pd.DataFrame) -> Labeller:
    """Age tertiles and class lists from the ``train`` rows of ``meta`` (scan index columns)."""
    train = meta[meta["split"] == "train"]
    ages = pd.to_numeric(train["age"], errors="coerce").dropna()
    cuts = tuple(float(c) for c in np.quantile(ages, [1 / 3, 2 / 3])) if len(ages) >= 3 else None
    classes = {"sex": ["Male", "Female"], "age_bin": list(AGE_BINS)}
    for task in ("diagnosis", "site", "dataset"):
        vals = train[task].dropna().astype(str).str.strip().str.capitalize() if task in train else pd.Series(dtype=str)
        classes[task] = sorted(set(vals) - {""})
    return Labeller(cuts, classes)


def with_descriptions(prompt: str, descriptions: dict[str, str]) -> str:
    """``prompt`` with each ``<scan:ID>`` followed by that scan's description line (fMRI-LM's
    optional descriptor part of a prompt); scans without one are left as they are."""
    return SCAN.sub(lambda m: m.group(0) + (f"{descriptions[m.group(1)]}\n" if m.group(1) in descriptions else ""), prompt)


def question_prompt(scan_id: str, question: str) -> str:
    """``<scan:ID>### Question: q\\n### Answer:``."""
    return f"<scan:{scan_id}>### Question: {question}\n### Answer:"


def build_instructions(meta: pd.DataFrame, captions: dict[str, list[str]], spec: InstructionSpec,
                       labeller: Labeller | None = None, splits: tuple[str, ...] | None = None) -> pd.DataFrame:
    """Instruction rows for the scans of ``meta`` (``scan_id, subject_id, split, dataset, site,
    age, sex, diagnosis``) in ``splits`` (default: all). In-context examples come from the train
    split of ``meta`` only and never from the query's subject. Seeded by ``spec.seed``."""
    labeller = labeller or fit_labeller(meta)
    rng = np.random.default_rng(spec.seed)
    meta = meta.sort_values("scan_id").reset_index(drop=True)
    train = meta[meta["split"] == "train"]
    rows = []
    for row in meta.itertuples(index=False):
        if splits and row.split not in splits:
            continue
        for task in sorted(t for t, w in spec.tasks.items() if w > 0):
            if task not in OPEN and task not in REGRESSION and len(labeller.classes.get(task, [])) < 2:
                continue  # a task with fewer than two classes in training has nothing to learn
            for _ in range(spec.per_scan):
                answer = labeller.answer(task, row, captions, rng)
                if answer is None:
                    continue
                for paradigm in spec.paradigms:
                    made = _make(paradigm, task, row, answer, meta, train, captions, labeller, spec, rng)
                    if made is not None:
                        rows.append(made)
    cols = ["scan_id", "subject_id", "split", "task", "paradigm", "prompt", "answer", "choices", "target", "context"]
    return pd.DataFrame(rows, columns=cols)


def _question(task: str, spec: InstructionSpec, rng: np.random.Generator) -> str:
    options = QUESTIONS[task]
    return options[int(rng.integers(len(options)))] if spec.paraphrases else options[0]


def _make(paradigm, task, row, answer, meta, train, captions, labeller, spec, rng) -> dict | None:
    choices = labeller.choices(task) if task in CLASSIFICATION else []
    target = float(row.age) if task == "age" else np.nan
    base = {"scan_id": row.scan_id, "subject_id": row.subject_id, "split": row.split, "task": task, "paradigm": paradigm,
            "answer": answer, "choices": choices, "target": target}
    if paradigm == "single":
        return base | {"prompt": question_prompt(row.scan_id, _question(task, spec, rng)), "context": []}
    if paradigm == "multi":
        others = [t for t in spec.tasks if t != task and t not in OPEN and spec.tasks[t] > 0]
        given = []
        for other in rng.permutation(others)[:2]:
            a = labeller.answer(str(other), row, captions, rng)
            if a is not None:
                given.append(f"### Question: {_question(str(other), spec, rng)}\n### Answer:{a}\n")
        if not given:
            return None
        return base | {"prompt": f"<scan:{row.scan_id}>" + "".join(given) + f"### Question: {_question(task, spec, rng)}\n### Answer:",
                       "context": []}
    if task in OPEN:
        return None  # a few-shot caption adds nothing the single paradigm does not
    context = fewshot_context(task, row, train, labeller, spec.fewshot_k, rng)
    if context is None:
        return None
    question = _question(task, spec, rng)
    shots = "".join(f"{question_prompt(c.scan_id, question)}{labeller.answer(task, c, captions, rng)}\n\n" for c in context)
    return base | {"prompt": shots + question_prompt(row.scan_id, question), "context": [c.scan_id for c in context]}


def fewshot_context(task: str, row, train: pd.DataFrame, labeller: Labeller, k: int, rng: np.random.Generator) -> list | None:
    """``k`` training scans of other subjects with a known answer, label-balanced for
    classification (classes in turn, shuffled); ``None`` if there are not enough."""
    pool = [r for r in train.itertuples(index=False) if r.subject_id != row.subject_id]
    if task in CLASSIFICATION:
        by_class: dict[str, list] = {}
        for r in pool:
            label = labeller.label(task, r)
            if label is not None:
                by_class.setdefault(label, []).append(r)
        if not by_class:
            return None
        order = [by_class[c] for c in rng.permutation(sorted(by_class))]
        picks, i = [], 0
        while len(picks) < k and any(order):
            bucket = order[i % len(order)]
            if bucket:
                picks.append(bucket.pop(int(rng.integers(len(bucket)))))
            i += 1
    else:
        known = [r for r in pool if not is_missing(r.age)]
        picks = [known[i] for i in rng.permutation(len(known))[:k]]
    if len(picks) < k:
        return None
    return [picks[i] for i in rng.permutation(len(picks))]


def encode(prompt: str, answer: str, fmri_part, tokenizer, objective: int = 0, with_answer: bool = True):
    """An :class:`~fmrilm.data.lm_sequences.Example` of ``prompt`` (fMRI blocks from
    ``fmri_part(scan_id)``) followed by ``answer`` and the end token as targets (or, with
    ``with_answer=False``, the prompt alone, for scoring and generation). A block's scan vector
    (if any) enters at the end of the last ``### Answer:`` before the next block: the token that
    predicts the answer about that scan reads the whole-scan summary directly."""
    from fmrilm.data.lm_sequences import SCAN_HERE, compose

    blocks = list(SCAN.finditer(prompt))
    parts = [("text", _ids(tokenizer, prompt[: blocks[0].start()]))] if blocks and blocks[0].start() else []
    if not blocks:
        parts.append(("text", _ids(tokenizer, prompt)))
    for i, m in enumerate(blocks):
        parts.append(fmri_part(m.group(1)))
        text = prompt[m.end() : blocks[i + 1].start() if i + 1 < len(blocks) else len(prompt)]
        cut = text.rfind(ANSWER_CUE)  # the block's scan vector enters where its (last) question's answer is predicted
        if cut >= 0:
            cut += len(ANSWER_CUE)
            parts += [("text", _ids(tokenizer, text[:cut])), (SCAN_HERE,)]
            text = text[cut:]
        if text:
            parts.append(("text", _ids(tokenizer, text)))
    if with_answer:
        parts.append(("answer", np.concatenate([_ids(tokenizer, answer), [tokenizer.eos_token_id]])))
    return compose(parts, objective)


def _ids(tokenizer, text: str) -> np.ndarray:
    return np.asarray(tokenizer(text, add_special_tokens=False)["input_ids"], np.int64)


def kshot_rows(task: str, train: pd.DataFrame, labeller: Labeller, k: int, seed: int) -> pd.DataFrame:
    """``k`` training scans per class (per age tertile for the age number) as single-question
    instruction rows (``scan_id, prompt, answer, task``), each with a paraphrase drawn at random."""
    rng = np.random.default_rng(seed)
    key = "age_bin" if task in REGRESSION else task
    by_class: dict[str, list] = {}
    for r in train.itertuples(index=False):
        label = labeller.label(key, r)
        if label is not None and not (task in REGRESSION and is_missing(r.age)):
            by_class.setdefault(label, []).append(r)
    rows = []
    for label in sorted(by_class):
        members = by_class[label]
        for j in rng.permutation(len(members))[:k]:
            r = members[j]
            answer = labeller.answer(task, r, {}, rng)
            q = QUESTIONS[task][int(rng.integers(len(QUESTIONS[task])))]
            rows.append({"scan_id": r.scan_id, "prompt": question_prompt(r.scan_id, q), "answer": answer, "task": task})
    return pd.DataFrame(rows, columns=["scan_id", "prompt", "answer", "task"])


def encode_rows(rows: pd.DataFrame, blocks, tokenizer, steps: int, seq_len: int, objective_of: dict[str, int] | None = None,
                with_answer: bool = True) -> tuple[list, list[int]]:
    """Encode instruction rows with fMRI blocks (``blocks.part(scan_id, steps)``, e.g. a
    :class:`fmrilm.artifacts.tokens.ScanBlocks`) of up to ``steps`` time steps, shrinking the
    blocks of a row that would not fit ``seq_len``; returns ``(examples, kept row positions)``
    (rows that do not fit even with one step are left out and counted in the log)."""
    examples, kept, dropped = [], [], 0
    for i, row in enumerate(rows.itertuples(index=False)):
        obj = objective_of[row.task] if objective_of else 0
        for s in range(steps, 0, -1):
            ex = encode(row.prompt, row.answer, lambda sid: blocks.part(sid, s), tokenizer, obj, with_answer)
            if len(ex) <= seq_len:
                examples.append(ex)
                kept.append(i)
                break
        else:
            dropped += 1
    if dropped:
        log.warning("%d of %d instruction rows do not fit seq_len=%d even with one fMRI step per scan: left out (raise seq_len)",
                    dropped, len(rows), seq_len)
    return examples, kept
