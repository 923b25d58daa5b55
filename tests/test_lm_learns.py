"""The LM path can learn: on a few hundred synthetic subjects, scan tokens from a tokenizer
encoder carry the planted sex effect into a tiny decoder that answers above chance on held-out
subjects; whole-brain state tokens alone carry a diagnosis that only dynamics show; tuning
overfits a handful of examples. CPU, no Ray: the library functions alone."""

import numpy as np
import pytest
import torch

from fmrilm.data.instructions import encode, question_prompt
from fmrilm.data.lm_sequences import fmri_part, pack
from fmrilm.data.signal import robust_scale, windows
from fmrilm.data.synth import SynthParams, cohort_table, simulate_scan
from fmrilm.eval import metrics
from fmrilm.eval.scoring import calibrated_choices, score_choices
from fmrilm.models.fmri_lm import FMRIInputLM, add_fmri_vocab, init_code_embeddings, load_backbone
from fmrilm.models.scan_token import scan_vector, standardiser
from fmrilm.models.tokenizer import FMRITokenizer, TokenizerConfig
from fmrilm.models.fmri_lm import forward_loss

CHOICES = [" Male", " Female"]
QUESTION = "What is the sex of this participant?"


@pytest.fixture(scope="module")
def cohort():
    """Codes and scan vectors of 320 synthetic subjects from an (untrained) tokenizer encoder."""
    torch.manual_seed(0)
    params = SynthParams(subjects=320, n_rois=16, n_networks=4, n_timepoints=192, sex_effect=0.4, seed=3)
    tok = FMRITokenizer(TokenizerConfig(patch=16, width=16, depth=1, heads=2, code_dim=8, num_codes=16)).eval()
    rows = cohort_table(params)
    scans = {}
    for i, row in enumerate(rows):
        x = torch.from_numpy(windows(robust_scale(simulate_scan(params, i)), 32, 32))
        codes, feats = tok.tokenize_with_features(x)  # [windows, rois, 2, width]
        codes = codes.permute(1, 0, 2).reshape(params.n_rois, -1).numpy()
        feats = feats.permute(1, 0, 2, 3).reshape(params.n_rois, -1, 16).numpy()
        scans[i] = {"codes": codes, "vector": scan_vector(feats), "sex": row["sex"]}
    return scans


def _model(vectors, seed=0):
    torch.manual_seed(seed)
    lm, tok, _ = load_backbone("tiny-gpt2", seed=seed)
    vocab = add_fmri_vocab(lm, tok, 16)
    init_code_embeddings(lm, vocab, torch.randn(16, 8))
    model = FMRIInputLM(lm, max_rois=16, scan_dim=vectors.shape[1])
    model.set_scan_scale(*standardiser(vectors))
    return model, tok, vocab


def _prompt(scan, vocab, steps=2):
    return lambda _: fmri_part(scan["codes"][:, :steps], vocab.first_code_id, vocab.open_id, vocab.close_id, scan=scan["vector"])


def _train(model, tok, vocab, scans, steps, lr, batch=32, seed=0):
    rows = [encode(question_prompt("s", QUESTION), " " + {"M": "Male", "F": "Female"}[s["sex"]], _prompt(s, vocab), tok) for s in scans]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    rng = np.random.default_rng(seed)
    model.train()
    for _ in range(steps):
        pick = rng.choice(len(rows), size=min(batch, len(rows)), replace=False)
        packed = {k: torch.from_numpy(v) for k, v in pack([rows[i] for i in pick], 64, tok.pad_token_id).items()}
        loss, _ = forward_loss(model, packed, {0: 1.0})
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), loss.item()


def _answers(model, tok, vocab, scans, reference):
    def scores(group):
        prompts = [encode(question_prompt("s", QUESTION), "", _prompt(s, vocab), tok, with_answer=False) for s in group]
        return score_choices(model, prompts, CHOICES, tok, 64)

    picked = calibrated_choices(scores(scans), scores(reference))
    return np.array([CHOICES[i].strip() for i in picked], dtype=object)


def test_scan_tokens_carry_the_sex_effect_to_held_out_subjects(cohort):
    """Trained on 240 subjects, scored on 80 others: balanced accuracy well above chance, with a
    bootstrap CI whose lower bound clears 0.5 (a constant answer would sit at 0.5)."""
    scans = [cohort[i] for i in sorted(cohort)]
    train, test = scans[:240], scans[240:]
    model, tok, vocab = _model(np.stack([s["vector"] for s in train]))
    model, _ = _train(model, tok, vocab, train, steps=60, lr=3e-3)
    pred = _answers(model, tok, vocab, test, train[:32])
    truth = np.array([{"M": "Male", "F": "Female"}[s["sex"]] for s in test], dtype=object)

    def fn(t, p):
        return metrics.classification(t, p, None, ["Male", "Female"])

    score = fn(truth, pred)["balanced_accuracy"]
    ci = metrics.bootstrap(fn, [truth, pred], n=300, seed=0, strata=truth)["balanced_accuracy"]
    assert len(set(pred)) == 2, "a constant answer"
    assert score >= 0.7 and ci[0] > 0.5, (score, ci)


def test_tuning_overfits_a_handful_of_examples(cohort):
    """Eight scans, their answers learnt: the loss falls near zero and every answer is right."""
    few = [cohort[i] for i in range(8)]
    model, tok, vocab = _model(np.stack([s["vector"] for s in few]), seed=1)
    model, loss = _train(model, tok, vocab, few, steps=80, lr=3e-3, batch=8)
    pred = _answers(model, tok, vocab, few, [])
    assert loss < 0.1 and list(pred) == [{"M": "Male", "F": "Female"}[s["sex"]] for s in few], (loss, list(pred))


def test_whole_brain_state_tokens_alone_carry_a_dynamics_diagnosis():
    """The dynamics cohort (a Case / Control diagnosis carried only by dynamics static FC cannot
    see): a state-layout tokenizer trained briefly, then a tiny LM fed nothing but each scan's
    192 codes (no scan vector, no features) answers the diagnosis of 80 held-out subjects well
    above chance, with a bootstrap CI whose lower bound clears 0.5. Scans are z-scored per ROI:
    Case scans' bursts then shrink every other frame, which the codes see; under the pipeline's
    robust scaling the same recipe stays near chance (docs/stages.md, token layouts)."""
    from fmrilm.models.alignment import AlignmentConfig
    from fmrilm.models.tokenizer_objective import TokenizerObjective

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    params = SynthParams(subjects=320, n_timepoints=192, dynamic_effects=["timescale", "lag", "dwell", "bursts"], seed=2)
    rows = cohort_table(params)
    raw = np.stack([simulate_scan(params, i) for i in range(len(rows))])
    x = torch.from_numpy(((raw - raw.mean(2, keepdims=True)) / raw.std(2, keepdims=True)).astype(np.float32))
    diagnosis = np.array([r["diagnosis"] for r in rows], dtype=object)
    train, test = np.arange(240), np.arange(240, 320)
    objective = TokenizerObjective(TokenizerConfig(layout="state", patch=1, width=32, depth=1, heads=2, code_dim=16, num_codes=128,
                                                   dead_threshold=0.5), AlignmentConfig(domain_weight=0.0), 1)
    opt = torch.optim.AdamW(objective.parameters(), 2e-3)
    for _ in range(400):
        batch = torch.stack([x[i, :, s : s + 32] for i, s in zip(rng.choice(train, 32), rng.choice(np.arange(0, 161, 16), 32))])
        loss = objective(batch, torch.ones(32, dtype=torch.bool))["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    tok = objective.tokenizer.eval()
    codes = [tok.tokenize(torch.from_numpy(windows(scan.numpy(), 32, 32))).reshape(1, -1).numpy() for scan in x]  # [1, 192] each

    lm, text_tok, _ = load_backbone("tiny-gpt2", seed=0)
    vocab = add_fmri_vocab(lm, text_tok, 128)
    init_code_embeddings(lm, vocab, tok.quantizer.codebook)
    question, choices = "What is the diagnosis of this participant?", [" Case", " Control"]

    def block(i):
        return lambda _: fmri_part(codes[i], vocab.first_code_id, vocab.open_id, vocab.close_id)

    examples = [encode(question_prompt("s", question), " " + diagnosis[i], block(i), text_tok) for i in train]
    length = len(examples[0].ids) + 4
    opt = torch.optim.AdamW(lm.parameters(), lr=3e-3, weight_decay=0.1)
    lm.train()
    for _ in range(150):
        packed = {k: torch.from_numpy(v) for k, v in pack([examples[i] for i in rng.choice(len(examples), 32, replace=False)], length,
                                                           text_tok.pad_token_id).items()}
        loss, _ = forward_loss(lm, packed, {0: 1.0})
        opt.zero_grad()
        loss.backward()
        opt.step()
    lm.eval()

    def scores(group):
        prompts = [encode(question_prompt("s", question), "", block(i), text_tok, with_answer=False) for i in group]
        return score_choices(lm, prompts, choices, text_tok, length)

    pred = np.array([choices[i].strip() for i in calibrated_choices(scores(test), scores(train[:32]))], dtype=object)

    def fn(t, p):
        return metrics.classification(t, p, None, ["Case", "Control"])

    score = fn(diagnosis[test], pred)["balanced_accuracy"]
    ci = metrics.bootstrap(fn, [diagnosis[test], pred], n=300, seed=0, strata=diagnosis[test])["balanced_accuracy"]
    assert len(set(pred)) == 2, "a constant answer"
    assert score >= 0.7 and ci[0] > 0.5, (score, ci)
