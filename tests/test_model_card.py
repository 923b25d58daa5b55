"""Model cards written from an export's metadata: backbone and licence, input contract,
training data, loading, and the held-out figures beside the baselines once evaluated."""

from fmrilm.data.contract import input_contract
from fmrilm.model_card import lm_card, tokenizer_card

CONTRACT = input_contract([{"dataset": "hcp", "version": "v-1", "atlas": "AAL2-94", "n_rois": 3, "roi_labels": ["A", "B", "C"],
                            "tr": [0.72]}], window=32, stride=16, patch=16, normalise=True, target_tr=None)
SPLIT = {"policy": None, "datasets": {"hcp": "v-1"}, "trained_subjects": ["hcp/1", "hcp/2"]}
META = {"backbone": {"source": "smollm2-135m", "kind": "offline", "family": "llama", "code_init": "linear-map"},
        "vocab": {"num_codes": 16}, "tokenizer": "s3://b/runs/tok/tokenizer", "layout": "base+adapter", "lora": True, "seq_len": 256,
        "split": SPLIT, "contract": CONTRACT, "scan_dim": 3}


def _row(task, method, paradigm, key, value, ci=(0.1, 0.9)):
    return {"task": task, "group": "heldout_subjects", "method": method, "paradigm": paradigm, "n": 40,
            "metrics": {key: value}, "ci": {key: list(ci)}}


def test_an_lm_card_says_what_the_model_is_how_to_load_it_and_what_it_was_trained_on():
    card = lm_card(META, "s3://b/runs/pre/model")
    assert "Apache-2.0" in card and "SmolLM2-135M-Instruct" in card
    assert "atlas `AAL2-94`, 3 ROIs in this order: A, B, C" in card and "native TR [0.72] s" in card
    assert "`hcp` version `v-1`" in card and "2 training subjects" in card
    assert 'PeftModel.from_pretrained(base, "s3://b/runs/pre/model/adapter")' in card and "inputs.safetensors" in card
    assert "Not evaluated yet" in card and "Model Card for Model ID" not in card


def test_an_evaluated_card_shows_fmrilm_beside_majority_and_fc_linear_with_cis():
    report = {"results": [_row("sex", "fmrilm", "zero_shot", "balanced_accuracy", 0.55), _row("sex", "fmrilm", "full", "balanced_accuracy", 0.91),
                          _row("sex", "majority", "baseline", "balanced_accuracy", 0.5, (0.5, 0.5)),
                          _row("sex", "fc_linear", "baseline", "balanced_accuracy", 0.96),
                          _row("age", "fmrilm", "full", "mae", 7.7), _row("age", "mean", "baseline", "mae", 17.4),
                          _row("age", "fc_linear", "baseline", "mae", 6.2)]}
    card = lm_card(META | {"stage": "instruct", "tasks": {"sex": 1.0, "age": 1.0}}, "/m", report, "/r/report.md")
    rows = [line for line in card.splitlines() if line.startswith("| sex") or line.startswith("| age")]
    assert rows == ["| sex | heldout_subjects | fmrilm (full) | 40 | balanced accuracy | 0.910 [0.100, 0.900] |",
                    "| sex | heldout_subjects | majority | 40 | balanced accuracy | 0.500 [0.500, 0.500] |",
                    "| sex | heldout_subjects | FC + linear (the prompt's time points) | 40 | balanced accuracy | 0.960 [0.100, 0.900] |",
                    "| age | heldout_subjects | fmrilm (full) | 40 | MAE | 7.700 [0.100, 0.900] |",
                    "| age | heldout_subjects | training mean | 40 | MAE | 17.400 [0.100, 0.900] |",
                    "| age | heldout_subjects | FC + linear (the prompt's time points) | 40 | MAE | 6.200 [0.100, 0.900] |"]
    assert "questions on sex, age" in card and "/r/report.md" in card


def test_a_tokenizer_card_has_its_codebook_contract_and_validation_figures():
    cfg = {"model": {"patch": 16, "depth": 2, "width": 64, "num_codes": 128, "code_dim": 32},
           "alignment": {"text_source": "minilm", "domain_weight": 0.5, "adversary": "grl"}, "step": 300, "run": "tok",
           "split": SPLIT, "contract": CONTRACT}
    card = tokenizer_card(cfg, {"used_fraction": 0.5, "perplexity": 40.0}, "/t", {"val/r2": 0.31, "loss": 1.0})
    assert "50% of codes used, perplexity 40.0" in card and "| r2 | 0.310 |" in card and "| loss" not in card
    assert "atlas `AAL2-94`" in card and 'load_tokenizer("/t")' in card
