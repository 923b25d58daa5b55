"""Stage-3 building blocks without a cluster: the instruction builder (answers, leakage,
paraphrases, few-shot balance), encoding, constrained scoring, generation and the metrics."""

import numpy as np
import pandas as pd
import pytest
import torch

from fmrilm.data.instructions import (AGE_BINS, InstructionSpec, build_instructions, encode, fewshot_context, fit_labeller)
from fmrilm.data.lm_sequences import IGNORE, Example, fmri_part
from fmrilm.eval import metrics
from fmrilm.eval.scoring import generate, parse_number, score_choices, sequence_logprobs
from fmrilm.models.fmri_lm import add_fmri_vocab, load_backbone


def cohort(n=40, seed=0):
    rng = np.random.default_rng(seed)
    splits = np.array(["train"] * (n - 10) + ["val"] * 5 + ["test"] * 5)
    return pd.DataFrame({
        "scan_id": [f"ds_sub-{i:03d}_rest" for i in range(n)], "subject_id": [f"{i:03d}" for i in range(n)],
        "split": splits, "dataset": "ds", "site": [f"site{i % 2}" for i in range(n)],
        "age": rng.uniform(10, 70, n).round(1), "sex": np.where(np.arange(n) % 3 == 0, "F", "M"), "diagnosis": None,
    })


def test_answers_match_phenotypes():
    meta = cohort()
    lab = fit_labeller(meta)
    rows = build_instructions(meta, {}, InstructionSpec(tasks={"sex": 1, "age_bin": 1, "age": 1}, paradigms=["single"]))
    by_id = meta.set_index("scan_id")
    train_ages = meta[meta.split == "train"]["age"]
    cuts = np.quantile(train_ages, [1 / 3, 2 / 3])
    assert lab.age_cuts == pytest.approx(tuple(cuts))
    assert set(rows["task"]) == {"sex", "age_bin", "age"} and len(rows) == 3 * len(meta)
    for r in rows.itertuples():
        truth = by_id.loc[r.scan_id]
        if r.task == "sex":
            assert r.answer == (" Female" if truth.sex == "F" else " Male") and list(r.choices) == [" Male", " Female"]
        elif r.task == "age":
            assert r.answer == f" {int(round(truth.age))}" and r.target == truth.age
        else:
            assert r.answer == " " + AGE_BINS[int(truth.age >= cuts[0]) + int(truth.age >= cuts[1])]
        assert r.prompt.startswith(f"<scan:{r.scan_id}>### Question: ") and r.prompt.endswith("### Answer:")
    # a site with one class in training is skipped, diagnosis (all unknown) gives no rows
    none = build_instructions(meta, {}, InstructionSpec(tasks={"diagnosis": 1}, paradigms=["single"]))
    assert none.empty


def test_no_heldout_subject_in_training_prompts_or_contexts():
    meta = cohort()
    spec = InstructionSpec(tasks={"sex": 1, "age": 1, "age_bin": 1}, paradigms=["single", "multi", "fewshot"], fewshot_k=4, per_scan=2)
    train_rows = build_instructions(meta, {}, spec, splits=("train",))
    heldout_ids = set(meta[meta.split != "train"]["scan_id"])
    import re

    for r in train_rows.itertuples():
        mentioned = set(re.findall(r"<scan:([^>]+)>", r.prompt))
        assert not mentioned & heldout_ids, r.prompt
    # queries from held-out scans still take their in-context examples from training subjects only
    all_rows = build_instructions(meta, {}, spec)
    fewshot = all_rows[all_rows.paradigm == "fewshot"]
    assert len(fewshot) and set(fewshot["split"]) >= {"val", "test"}
    split_of = dict(zip(meta.scan_id, meta.split))
    subject_of = dict(zip(meta.scan_id, meta.subject_id))
    for r in fewshot.itertuples():
        assert len(r.context) == 4
        assert all(split_of[c] == "train" and subject_of[c] != r.subject_id for c in r.context)


def test_fewshot_is_label_balanced_beyond_one_per_class():
    meta = cohort()
    lab = fit_labeller(meta)
    train = meta[meta.split == "train"]
    query = next(meta[meta.split == "test"].itertuples(index=False))
    for k in (2, 4, 8):
        ctx = fewshot_context("sex", query, train, lab, k, np.random.default_rng(k))
        sexes = [c.sex for c in ctx]
        assert len(ctx) == k and sexes.count("F") == sexes.count("M") == k // 2  # fMRI-LM's code capped this at 1


def test_paraphrase_sampling_is_seeded():
    meta = cohort()
    a = build_instructions(meta, {}, InstructionSpec(tasks={"sex": 1}, paradigms=["single"], seed=1))
    b = build_instructions(meta, {}, InstructionSpec(tasks={"sex": 1}, paradigms=["single"], seed=1))
    c = build_instructions(meta, {}, InstructionSpec(tasks={"sex": 1}, paradigms=["single"], seed=2))
    fixed = build_instructions(meta, {}, InstructionSpec(tasks={"sex": 1}, paradigms=["single"], paraphrases=False))
    assert a["prompt"].tolist() == b["prompt"].tolist() != c["prompt"].tolist()
    assert a["prompt"].str.split("Question: ").str[1].nunique() > 1
    assert fixed["prompt"].str.split("Question: ").str[1].nunique() == 1


def test_bad_instruction_specs_fail_clearly():
    with pytest.raises(ValueError, match="unknown task"):
        InstructionSpec(tasks={"handedness": 1})
    with pytest.raises(ValueError, match="paradigm"):
        InstructionSpec(paradigms=["chain-of-thought"])


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model, tok, _ = load_backbone("tiny-gpt2")
    vocab = add_fmri_vocab(model, tok, 16)
    return model.eval(), tok, vocab


def _part(vocab, rois=3, steps=2, seed=0):
    codes = np.random.default_rng(seed).integers(0, 16, (rois, steps))
    return fmri_part(codes, vocab.first_code_id, vocab.open_id, vocab.close_id)


def test_encode_targets_only_the_answer(tiny):
    model, tok, vocab = tiny
    ex = encode("<scan:a>### Question: sex?\n### Answer:", " Female", lambda sid: _part(vocab), tok, objective=3)
    answer = tok(" Female", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert ex.targets[ex.targets != IGNORE].tolist() == answer
    assert set(ex.objective[ex.targets != IGNORE]) == {3} and (ex.objective[ex.targets == IGNORE] == -1).all()
    assert ex.ids[0] == vocab.open_id and (np.diff(ex.groups) >= 0).all()
    first = int(np.argmax(ex.targets != IGNORE))
    assert ex.ids[first + 1] == answer[0]  # the token before an answer token predicts it


def test_encode_rows_shrinks_the_fmri_blocks_to_fit_and_leaves_out_what_never_fits(tiny):
    import pandas as pd

    from fmrilm.data.instructions import encode_rows

    _, tok, vocab = tiny

    class Blocks:  # what ScanBlocks gives: a block of the scan's first `steps` time steps
        def part(self, scan_id, steps):
            return _part(vocab, rois=4, steps=steps)

    rows = pd.DataFrame({"prompt": ["<scan:a>### Question: sex?\n### Answer:"] * 2, "answer": [" Female", " Male"],
                         "task": ["sex", "sex"]})
    full, kept = encode_rows(rows, Blocks(), tok, steps=6, seq_len=512, objective_of={"sex": 2})
    assert kept == [0, 1] and all(set(e.objective[e.targets != IGNORE]) == {2} for e in full)
    fit = len(full[0]) - 4 * 3  # room for 3 of the 6 steps of 4 ROIs
    shrunk, kept = encode_rows(rows.iloc[:1], Blocks(), tok, steps=6, seq_len=fit)
    assert kept == [0] and len(shrunk[0]) <= fit and len(shrunk[0]) == len(full[0]) - 4 * 3
    none, kept = encode_rows(rows.iloc[:1], Blocks(), tok, steps=6, seq_len=5)
    assert none == [] and kept == []


def test_scan_codes_joins_non_overlapping_windows_of_each_scan():
    import pandas as pd

    from fmrilm.artifacts.tokens import scan_codes

    rng = np.random.default_rng(0)
    rows = []
    for start in (0, 16, 32, 48):  # window 32, stride 16: the windows at 0 and 32 do not overlap
        codes = rng.integers(0, 8, (3, 2))
        rows.append({"scan_id": "s", "start": start, "n_rois": 3, "n_patches": 2, "codes": codes.ravel().tolist(),
                     "features": np.full((3, 2, 4), start, np.float32).ravel().tolist(), "_codes": codes})
    table = pd.DataFrame(rows).sample(frac=1, random_state=0)  # any row order
    codes, feats = scan_codes(table.drop(columns="_codes"), hop=32)
    want = np.concatenate([rows[0]["_codes"], rows[2]["_codes"]], axis=1)
    assert (codes["s"] == want).all() and feats["s"].shape == (3, 4, 4)
    assert (feats["s"][:, :2] == 0).all() and (feats["s"][:, 2:] == 32).all()
    codes, feats = scan_codes(table.drop(columns=["_codes", "features"]), hop=32)
    assert codes["s"].shape == (3, 4) and feats == {}


def test_a_connectivity_tokenizer_gives_a_token_for_every_window(tmp_path):
    """Its scans' code sequences take every window (``stride`` apart), their rebuilt FC is the
    mean of the windows' rebuilt correlations, and the stage refuses a patch shorter than the window."""
    from fmrilm.artifacts import tokenizer as artifact
    from fmrilm.artifacts.tokens import CodeDecoder, scan_codes, token_hop
    from fmrilm.train.tokenizer import TokenizerStageSpec
    from tests.test_brainmarks import tiny_export

    uri = tiny_export(tmp_path / "conn", rois=5, layout="connectivity")
    cfg = artifact.read_config(uri)
    assert token_hop(cfg) == 4 and token_hop(artifact.read_config(tiny_export(tmp_path / "roi", rois=5))) == 16
    rows = [{"scan_id": "s", "start": start, "n_rois": 5, "n_channels": 1, "n_patches": 1, "codes": [start % 16]} for start in range(0, 40, 4)]
    codes, _ = scan_codes(pd.DataFrame(rows), hop=token_hop(cfg))
    assert codes["s"].tolist() == [[start % 16 for start in range(0, 40, 4)]]
    decoder = CodeDecoder(uri, cfg, {"s": 5})
    model = artifact.load_tokenizer(uri)[0]
    want = model.decode(torch.from_numpy(codes["s"].T[:, :, None].copy()), 5).mean(0).numpy()
    np.testing.assert_allclose(decoder.fc("s", codes["s"]), want[np.triu_indices(5, 1)], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="codes each window whole: set model.patch=30"):
        TokenizerStageSpec(model={"layout": "connectivity", "patch": 10}, data={"window": 30, "stride": 2})


def test_packed_scoring_equals_one_sequence_at_a_time(tiny):
    model, tok, vocab = tiny
    prompts = [encode(f"<scan:{i}>### Question: which?\n### Answer:", "", lambda sid, i=i: _part(vocab, seed=i), tok, with_answer=False)
               for i in range(3)]
    choices = [" lower", " mean", " higher"]
    packed = score_choices(model, prompts, choices, tok, seq_len=128)
    for i, p in enumerate(prompts):
        for j, c in enumerate(choices):
            ids = tok(c, add_special_tokens=False)["input_ids"]
            alone = score_choices(model, [p], [c], tok, seq_len=len(p) + len(ids))[0, 0]  # one unpadded row
            assert packed[i, j] == pytest.approx(alone, abs=1e-4) and packed[i, j] < 0


class ToyLM(torch.nn.Module):
    """Puts all next-token probability on ``favourite`` after any token."""

    def __init__(self, vocab_size, favourite):
        super().__init__()
        self.vocab_size, self.favourite = vocab_size, favourite

    def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=False):
        logits = torch.full((*input_ids.shape, self.vocab_size), -10.0)
        logits[..., self.favourite] = 10.0
        return type("Out", (), {"logits": logits})()


def test_constrained_scoring_picks_the_likelier_answer(tiny):
    _, tok, _ = tiny
    male, female = (tok(w, add_special_tokens=False)["input_ids"][0] for w in (" male", " female"))
    prompt = Example(np.array([5, 6, 7]), np.full(3, IGNORE), np.arange(3, dtype=np.int32), np.arange(3), np.full(3, -1, np.int8))
    for fav, want in ((male, 0), (female, 1)):
        scores = score_choices(ToyLM(len(tok), fav), [prompt, prompt], [" male", " female"], tok, seq_len=16)
        assert (scores.argmax(1) == want).all() and scores[0, want] == pytest.approx(0.0, abs=1e-3)
    digits = tok("42", add_special_tokens=False)["input_ids"][0]
    new = generate(ToyLM(len(tok), digits), prompt, 3, tok.eos_token_id)
    assert new == [digits] * 3 and parse_number(tok.decode(new)) == 42  # the first number of "42 42 42"
    assert parse_number(" about 34 years") == 34 and parse_number("no idea") is None


def test_sequence_logprobs_matches_a_plain_forward(tiny):
    model, tok, _ = tiny
    ids = np.array(tok("strong default mode coupling", add_special_tokens=False)["input_ids"])
    ex = Example(ids, np.concatenate([ids[1:], [IGNORE]]), np.arange(len(ids), dtype=np.int32), np.arange(len(ids)),
                 np.zeros(len(ids), np.int8))
    got = sequence_logprobs(model, [ex, ex], 64, tok.pad_token_id)
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.from_numpy(ids)[None]).logits[0], -1)
    want = float(logp[torch.arange(len(ids) - 1), torch.from_numpy(ids[1:])].sum())
    assert got == pytest.approx([want, want], abs=1e-4)


def test_metrics_agree_with_sklearn():
    from sklearn.metrics import accuracy_score, balanced_accuracy_score, roc_auc_score

    rng = np.random.default_rng(0)
    y = rng.choice(["Male", "Female"], 60)
    scores = rng.normal(size=(60, 2)) + np.stack([y == "Male", y == "Female"], 1)
    pred = np.where(scores[:, 1] > scores[:, 0], "Female", "Male")
    m = metrics.classification(y, pred, scores, ["Male", "Female"])
    assert m["accuracy"] == pytest.approx(accuracy_score(y, pred))
    assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, pred))
    assert m["auc"] == pytest.approx(roc_auc_score(y == "Female", scores[:, 1] - scores[:, 0]))
    age = rng.uniform(10, 70, 50)
    guess = age + rng.normal(0, 5, 50)
    r = metrics.regression(age, guess)
    assert r["mae"] == pytest.approx(np.abs(age - guess).mean()) and r["pearson_r"] == pytest.approx(np.corrcoef(age, guess)[0, 1])
    ci = metrics.bootstrap(metrics.regression, [age, guess], n=300)
    assert ci["mae"][0] < r["mae"] < ci["mae"][1]
    wide = metrics.bootstrap(metrics.regression, [age[:10], guess[:10]], n=300)
    assert (wide["mae"][1] - wide["mae"][0]) > (ci["mae"][1] - ci["mae"][0])


def test_a_constant_predictor_cannot_look_good_and_is_flagged():
    """The old bootstrap resampled scans freely: a resample holding one class scores a constant
    predictor's balanced accuracy 1.0, so its CI reached [0.50, 1.00]. Stratified by class, every
    resample keeps both classes and the constant predictor stays at chance."""
    y = np.array(["M"] * 5 + ["F"] * 3)
    constant = np.array(["M"] * 8)

    def fn(t, p):
        return metrics.classification(t, p, None, ["F", "M"])

    ci = metrics.bootstrap(fn, [y, constant], n=500, seed=0, strata=y)
    assert ci["balanced_accuracy"] == (0.5, 0.5)  # includes chance, and nothing above it
    one_class = np.zeros(8, dtype=int)  # a free resample that drew only the first (M) scan: P = (5/8)^8 per draw
    assert fn(y[one_class], constant[one_class])["balanced_accuracy"] == 1.0  # what unstratified resampling let in
    assert metrics.failures(constant, n_classes=2) == ["constant prediction"]
    assert metrics.failures(np.array([31.0, 31.0, 31.0]), parse_rate=0.0) == ["constant prediction", "no answer parsed"]
    assert metrics.failures(np.array(["M", "F", "M"]), n_classes=2) == []


def test_the_report_marks_failed_results():
    from fmrilm.eval.report import markdown

    res = {"task": "sex", "group": "heldout_subjects", "paradigm": "full", "method": "fmrilm", "k": None, "n": 8,
           "metrics": {"balanced_accuracy": 0.5}, "failures": ["constant prediction"]}
    base = {**res, "paradigm": "baseline", "method": "fc_linear", "metrics": {"balanced_accuracy": 0.9}, "failures": []}
    report = {"pretrained": "p", "spec": {"model": "m"}, "groups": {"train": 10, "heldout_subjects": 8}, "results": [res, base]}
    md = markdown(report)
    assert "0.500 FAILED: constant prediction" in md and "## Failures" in md and "- sex / heldout_subjects / full: constant prediction" in md


def test_kshot_rows_sit_beside_fc_linear_on_the_same_k_scans():
    from fmrilm.eval.report import table_rows

    row = {"task": "sex", "group": "heldout_subjects", "k": 8, "n": 8, "failures": []}
    results = [{**row, "paradigm": "kshot_lora", "method": "fmrilm", "seed": s, "metrics": {"balanced_accuracy": v}} for s, v in ((0, 0.6), (1, 0.7))]
    results += [{**row, "paradigm": "kshot_lora", "method": "fc_linear", "seed": s, "metrics": {"balanced_accuracy": v}} for s, v in ((0, 0.8), (1, 0.9))]
    results += [{**row, "k": None, "paradigm": "baseline", "method": "fc_linear", "metrics": {"balanced_accuracy": 0.95}}]
    header, rows = table_rows({"results": results}, "heldout_subjects")
    shot = dict(zip(header, rows[0]))
    assert shot["paradigm"] == "kshot_lora k=8" and shot["fmrilm"] == "0.650 (seeds 0.60-0.70)"
    assert shot["fc_linear"] == "0.850 (seeds 0.80-0.90) (same k scans)"  # not the baseline fitted on every training subject


def test_calibration_removes_a_constant_preference():
    """A model that prefers answer 1 by a margin everywhere but ranks the scans correctly (AUC 1):
    the raw argmax answers 1 for every scan; removing each answer's mean score over training scans
    recovers the ranking."""
    from fmrilm.eval.scoring import calibrated_choices

    signal = np.array([-1.0, -0.5, 0.5, 1.0])
    scores = np.stack([signal, np.full(4, 5.0)], 1)  # answer 0's score carries the signal, answer 1 wins by 5
    reference = np.stack([np.array([-0.8, 0.8, -0.2, 0.2]), np.full(4, 5.0)], 1)
    assert (calibrated_choices(scores) == 1).all()
    assert calibrated_choices(scores, reference).tolist() == [1, 1, 0, 0]


class TwoWayLM(torch.nn.Module):
    """Splits next-token probability equally between two tokens after any token."""

    def __init__(self, vocab_size, a, b):
        super().__init__()
        self.vocab_size, self.a, self.b = vocab_size, a, b

    def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=False, logits_to_keep=0):
        logits = torch.full((*input_ids.shape, self.vocab_size), -20.0)
        logits[..., [self.a, self.b]] = 10.0
        return type("Out", (), {"logits": logits if isinstance(logits_to_keep, int) else logits[:, logits_to_keep]})()


def test_constrained_numbers_are_the_mean_of_the_allowed_values(tiny):
    from fmrilm.eval.scoring import expected_numbers

    _, tok, _ = tiny
    thirty, fifty = (tok(w, add_special_tokens=False)["input_ids"][0] for w in (" 30", " 50"))
    prompt = Example(np.array([5, 6, 7]), np.full(3, IGNORE), np.arange(3, dtype=np.int32), np.arange(3), np.full(3, -1, np.int8))
    got = expected_numbers(TwoWayLM(len(tok), thirty, fifty), [prompt, prompt], tok, np.arange(20, 61), seq_len=16)
    np.testing.assert_allclose(got, [40.0, 40.0], atol=1e-3)
    only_low = expected_numbers(TwoWayLM(len(tok), thirty, fifty), [prompt], tok, np.arange(20, 41), seq_len=16)
    np.testing.assert_allclose(only_low, [30.0], atol=1e-3)  # 50 is not an allowed value: renormalised over those that are
    # a near-constant number answer is flagged like a constant one
    assert metrics.failures(np.array([40.0, 40.001, 39.999]), y_true=np.array([20.0, 40.0, 60.0])) == ["constant prediction"]
    assert metrics.failures(np.array([25.0, 41.0, 55.0]), y_true=np.array([20.0, 40.0, 60.0])) == []


def test_linear_baseline_fits_one_scan_per_class():
    """k-shot rows at k = 1 give one training scan per class: no inner CV, still a prediction."""
    from fmrilm.eval.baselines import linear_classifier

    x = np.array([[0.0, 1.0], [1.0, 0.0]])
    pred, scores = linear_classifier(x, np.array(["M", "F"], dtype=object), np.array([[0.1, 0.9], [0.9, 0.1]]), ["M", "F"])
    assert pred.tolist() == ["M", "F"] and scores.shape == (2, 2)


def test_deconfounding_removes_site_and_motion_fitted_on_training_scans_only():
    from fmrilm.eval.baselines import confounds, deconfound

    rng = np.random.default_rng(0)
    sites_tr, sites_te = ["A", "B"] * 20, ["A", "B", "C"] * 4
    fd_tr, fd_te = list(rng.uniform(0.05, 0.4, 40)), [None] + list(rng.uniform(0.05, 0.4, 11))
    c_tr, c_te = confounds(sites_tr, fd_tr, sites_tr, fd_tr), confounds(sites_te, fd_te, sites_tr, fd_tr)
    assert c_tr.shape == (40, 2) and c_te[2, 0] == 0 and c_te[0, 1] == pytest.approx(np.mean(fd_tr))  # unseen site C; missing FD at the mean
    signal = rng.normal(size=(52, 3))
    x = signal + 3.0 * np.vstack([c_tr, c_te])[:, :1] - 5.0 * np.vstack([c_tr, c_te])[:, 1:]  # every edge shifted by site and motion
    r_tr, r_te = deconfound(x[:40], c_tr, x[40:], c_te)
    design = np.column_stack([np.ones(40), c_tr])
    assert np.abs(np.linalg.lstsq(design, r_tr - r_tr.mean(0), rcond=None)[0]).max() < 1e-9  # nothing of the confounds left
    assert np.corrcoef(r_te[:, 0], signal[40:, 0])[0, 1] > 0.9
    assert confounds(["A"], [None], ["A", "A"], [None, None]).shape == (1, 0)  # one site, no motion: nothing to regress


def test_the_report_shows_results_by_site():
    from fmrilm.eval.report import markdown

    row = {"task": "sex", "group": "heldout_subjects", "paradigm": "full", "method": "fmrilm", "k": None, "n": 8, "failures": [],
           "metrics": {"balanced_accuracy": 0.8}, "ci": {"balanced_accuracy": [0.6, 0.9]}}
    report = {"pretrained": "p", "spec": {"model": "m"}, "groups": {"train": 10, "heldout_subjects": 8}, "results": [row],
              "by_site": [{**row, "site": "NYU", "n": 5}, {**row, "site": "PITT", "n": 3, "metrics": {"balanced_accuracy": 0.7}}]}
    md = markdown(report)
    assert "## By site" in md and "| sex | heldout subjects | fmrilm | NYU | 5 | balanced_accuracy | 0.800 [0.600, 0.900] |" in md
    assert "| PITT | 3 |" in md


def test_the_table_shows_the_best_classical_reader_and_the_paired_gap():
    from fmrilm.eval.report import classical_rows, markdown, table_rows

    row = {"task": "sex", "group": "heldout_subjects", "k": None, "seed": None, "n": 40, "failures": []}
    gap = {"gap": -0.05, "ci": (-0.12, 0.01), "n": 40, "mcnemar_p": 0.21}
    results = [{**row, "paradigm": "full", "method": "fmrilm", "metrics": {"balanced_accuracy": 0.9}, "vs": {"best_classical": gap}},
               {**row, "paradigm": "baseline", "method": "prewhitened_fc_linear", "metrics": {"balanced_accuracy": 0.95}},
               {**row, "paradigm": "baseline", "method": "fc_linear", "metrics": {"balanced_accuracy": 0.93}},
               {**row, "paradigm": "baseline", "method": "best_classical", "reader": "prewhitened_fc_linear",
                "metrics": {"balanced_accuracy": 0.95}}]
    header, rows = table_rows({"results": results}, "heldout_subjects")
    full = dict(zip(header, rows[0]))
    assert full["best classical"] == "0.950 (prewhitened_fc_linear)"
    assert full["fmrilm - best classical"] == "-0.050 [-0.12, +0.01], McNemar p 0.21"
    header, rows = classical_rows({"results": results}, "heldout_subjects")
    table = {r[0]: r[1] for r in rows}
    assert table["prewhitened_fc"] == "0.950 *" and table["fc"] == "0.930" and "lagged_fc" not in table  # not fitted: no row
    md = markdown({"pretrained": "p", "spec": {"model": "m"}, "groups": {"train": 10, "heldout_subjects": 40}, "results": results})
    assert "## Classical readers (heldout subjects)" in md and "paired difference" in md


def test_calibration_uses_validation_subjects_class_balanced():
    import pandas as pd

    from fmrilm.data.instructions import fit_labeller
    from fmrilm.eval import run as ev

    train = pd.DataFrame({"scan_id": [f"s{i}" for i in range(40)], "subject_id": [f"p{i}" for i in range(40)],
                          "sex": ["F"] * 30 + ["M"] * 10, "age": [30.0] * 40, "diagnosis": [None] * 40, "site": ["a"] * 40,
                          "dataset": ["d"] * 40, "split": ["train"] * 40, "group": ["train"] * 40})
    labeller = fit_labeller(train)
    picked = ev.calibration_rows("sex", train, labeller, 16, 0)
    assert sorted(picked["sex"].value_counts().tolist()) == [8, 8]  # 3:1 in the pool, 1:1 in the reference
    assert ev.calibration_rows("age", train, labeller, 16, 0).empty
    spec = ev.EvalSpec(model="m")
    pool, which = ev.calibration_pool(spec, train, {"validation_subjects": ["p1", "p35", "p36"]})
    assert set(pool["subject_id"]) == {"p1", "p35", "p36"} and which.startswith("validation subjects")
    pool, which = ev.calibration_pool(spec, train, {})
    assert len(pool) == 40 and which == "training scans"
