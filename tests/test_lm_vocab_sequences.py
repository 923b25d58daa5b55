"""Stage-2 building blocks without a cluster: backbone loading, fMRI vocabulary, codebook init,
sequence construction, packing, the block-causal mask and per-objective losses."""

import numpy as np
import pytest
import torch

from fmrilm.data.lm_sequences import (F2F, F2T, IGNORE, T2T, attention_mask, fmri_to_fmri, fmri_to_text, pack,
                                      steps_that_fit, text_to_text)
from fmrilm.models.fmri_lm import (BackboneError, FMRIInputLM, add_fmri_vocab, fit_linear_map, init_code_embeddings, load_backbone,
                                   locate_backbone, objective_losses, sync_to_local)


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama", "tiny-qwen"])
def test_vocab_extension_keeps_text_ids_and_logits(name):
    model, tok, info = load_backbone(name)
    assert info["pretrained"] is False and info["kind"] == "builtin"
    model.eval()
    text = "unusually strong coupling between default-mode and frontoparietal networks"
    ids_before = tok(text)["input_ids"]
    x = torch.tensor([ids_before])
    with torch.no_grad():
        before = model(x).logits
    vocab = add_fmri_vocab(model, tok, 40)
    assert tok(text)["input_ids"] == ids_before
    assert vocab.base_vocab == before.shape[-1] and vocab.first_code_id >= vocab.base_vocab
    assert tok.convert_tokens_to_ids("<fmri_39>") == vocab.first_code_id + 39
    assert tok.tokenize("<fmri><fmri_7></fmri>") == ["<fmri>", "<fmri_7>", "</fmri>"]
    codebook = torch.nn.functional.normalize(torch.randn(40, 8), dim=-1)
    assert init_code_embeddings(model, vocab, codebook) == "codebook-projection"
    with torch.no_grad():
        after = model(x).logits
    assert after.shape[-1] == len(tok) == vocab.base_vocab + 42
    torch.testing.assert_close(after[..., : vocab.base_vocab], before, atol=1e-5, rtol=1e-5)
    table = model.get_input_embeddings().weight.detach()
    rows, text = table[vocab.code_ids()], table[: vocab.base_vocab]
    assert rows.std(0).sum() > 0  # new rows differ from each other
    assert rows.norm(dim=1).mean() == pytest.approx(float(text.norm(dim=1).mean()), rel=0.2)  # at a text row's scale
    near = torch.nn.functional.cosine_similarity(codebook[:, None], codebook[None], dim=-1)
    centred = rows - rows.mean(0)
    kept = torch.nn.functional.cosine_similarity(centred[:, None], centred[None], dim=-1)
    iu = torch.triu_indices(40, 40, 1)
    assert torch.corrcoef(torch.stack([near[iu[0], iu[1]], kept[iu[0], iu[1]]]))[0, 1] > 0.5  # the codebook's angles survive
    assert model.config.fmri_code_init == "codebook-projection" and model.config.fmri_vocab["num_codes"] == 40


def test_codebook_init_through_a_fitted_linear_map():
    model, tok, _ = load_backbone("tiny-gpt2")
    vocab = add_fmri_vocab(model, tok, 16)
    g = torch.Generator().manual_seed(0)
    true_w = torch.randn(8, 64, generator=g)
    codebook = torch.nn.functional.normalize(torch.randn(16, 8, generator=g), dim=-1)
    x = torch.randn(200, 8, generator=g)
    w, b = fit_linear_map(x, x @ true_w + 0.5, ridge=0.0)
    torch.testing.assert_close(w, true_w, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(b, torch.full((64,), 0.5), atol=1e-3, rtol=1e-3)
    assert init_code_embeddings(model, vocab, codebook, pairs=(x, x @ true_w)) == "linear-map"
    rows = model.get_input_embeddings().weight[vocab.code_ids()].detach()
    want = codebook @ true_w
    cos = torch.nn.functional.cosine_similarity(rows, want, dim=-1)
    assert (cos > 0.99).all()
    # wrong width: falls back to a projection of the codebook, and says so
    assert init_code_embeddings(model, vocab, codebook, pairs=(x, torch.randn(200, 32))) == "codebook-projection"


def test_bad_backbones_and_codebooks_fail_clearly(tmp_path):
    with pytest.raises(BackboneError, match="no config.json"):
        locate_backbone(str(tmp_path))
    with pytest.raises(BackboneError, match="neither a built-in"):
        locate_backbone("not/a/hub/id")
    assert locate_backbone("gpt2") == ("hub", "gpt2")
    model, tok, _ = load_backbone("tiny-gpt2")
    with pytest.raises(BackboneError, match="1..65536"):
        add_fmri_vocab(model, tok, 70000)
    add_fmri_vocab(model, tok, 4)
    with pytest.raises(BackboneError, match="applied twice"):
        add_fmri_vocab(model, tok, 4)


def test_folder_backbone_round_trip_and_object_store_sync(tmp_path, local_s3):
    model, tok, _ = load_backbone("tiny-llama")
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    loaded, tok2, info = load_backbone(str(tmp_path / "m"))
    assert info == {"source": str(tmp_path / "m"), "kind": "folder", "family": "llama", "pretrained": True}
    x = torch.tensor([tok("resting state")["input_ids"]])
    torch.testing.assert_close(loaded.eval()(x).logits, model.eval()(x).logits)
    # the same folder on S3: copied once into the node cache, then loaded
    from fmrilm import storage

    for f in (tmp_path / "m").iterdir():
        storage.write_bytes(storage.resolve(local_s3.uri(f"models/tiny/{f.name}")), f.read_bytes())
    local = sync_to_local(local_s3.uri("models/tiny"), str(tmp_path / "cache"))
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == sorted(p for p in __import__("os").listdir(local) if not p.startswith("."))
    assert sync_to_local(local_s3.uri("models/tiny"), str(tmp_path / "cache")) == local
    with pytest.raises(BackboneError, match="no config.json"):
        sync_to_local(local_s3.uri("models/none"), str(tmp_path / "cache"))


def test_fmri_to_fmri_predicts_the_next_step_of_each_roi():
    codes = np.array([[1, 2, 3], [4, 5, 6]])  # [rois=2, steps=3]
    ex = fmri_to_fmri(codes, first_code_id=100, open_id=90, close_id=91)
    assert ex.ids.tolist() == [90, 101, 104, 102, 105, 103, 106, 91]
    assert ex.targets.tolist() == [IGNORE, 102, 105, 103, 106, IGNORE, IGNORE, IGNORE]
    assert ex.groups.tolist() == [0, 1, 1, 2, 2, 3, 3, 4] and ex.positions.tolist() == list(range(8))
    assert ex.feats is None
    feats = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)  # [rois, steps, width]
    fx = fmri_to_fmri(codes, 100, 90, 91, feats=feats)
    assert fx.roi.tolist() == [-1, 0, 1, 0, 1, 0, 1, -1]
    assert (fx.feats[2] == feats[1, 0]).all() and (fx.feats[3] == feats[0, 1]).all() and (fx.feats[0] == 0).all()
    assert set(ex.objective[ex.targets != IGNORE]) == {F2F}


def test_fmri_to_text_and_text_to_text_targets():
    codes = np.array([[1, 2], [3, 4]])
    ex = fmri_to_text(codes, np.array([7, 8]), first_code_id=100, open_id=90, close_id=91, eos_id=2)
    assert ex.ids.tolist() == [90, 101, 103, 102, 104, 91, 7, 8, 2]
    assert ex.targets.tolist() == [IGNORE] * 5 + [7, 8, 2, IGNORE]
    assert ex.positions.tolist() == list(range(9))
    assert set(ex.objective[ex.targets != IGNORE]) == {F2T}
    t = text_to_text(np.array([7, 8]), bos_id=1, eos_id=2)
    assert t.ids.tolist() == [1, 7, 8, 2] and t.targets.tolist() == [7, 8, 2, IGNORE]
    assert set(t.objective[t.targets != IGNORE]) == {T2T}
    assert steps_that_fit(94, 512) == 5 and steps_that_fit(94, 512, extra=60) == 4


def test_packing_and_block_causal_mask():
    a = fmri_to_fmri(np.array([[1, 2], [3, 4]]), 100, 90, 91)  # 6 tokens
    b = text_to_text(np.array([7]), 1, 2)  # 3 tokens
    c = text_to_text(np.array([7, 8, 9]), 1, 2)  # 5 tokens
    packed = pack([a, b, c], seq_len=10, pad_id=0)
    assert packed["ids"].shape == (2, 10)
    assert packed["segments"][0].tolist() == [1] * 6 + [2] * 3 + [0]
    assert packed["segments"][1].tolist() == [1] * 5 + [0] * 5
    mask = attention_mask(packed["segments"], packed["groups"])[:, 0]
    m = mask[0]
    assert m[1, 2] and m[2, 1]  # ROIs of one step see each other
    assert m[3, 1] and not m[1, 3]  # later steps see earlier ones, not the reverse
    assert not m[6, 0] and not m[0, 6]  # examples in one row are kept apart
    assert m[7, 6] and not m[6, 7]  # text stays causal
    assert m[9, 9] and mask[1, 7, 7] and mask.sum(-1).min() >= 1  # padding rows are not empty
    torch_mask = attention_mask(torch.from_numpy(packed["segments"]), torch.from_numpy(packed["groups"]))
    assert torch.equal(torch_mask, torch.from_numpy(attention_mask(packed["segments"], packed["groups"])))
    with pytest.raises(ValueError, match="does not fit seq_len=4"):
        pack([a], 4, 0)
    f = fmri_to_text(np.array([[1, 2]]), np.array([7]), 100, 90, 91, 2, feats=np.ones((1, 2, 3), np.float32))
    both = pack([f, b], seq_len=10, pad_id=0)
    assert both["feats"].shape == (1, 10, 3) and both["roi"][0].tolist() == [-1, 0, 0, -1, -1, -1, -1, -1, -1, -1]
    assert both["feats"][0, 1:3].sum() == 6 and both["feats"][0, 3:].sum() == 0


def test_packed_rows_equal_separate_forward_passes():
    """Packing with the mask and reset positions gives each example the logits it has alone."""
    model, tok, _ = load_backbone("tiny-llama")
    vocab = add_fmri_vocab(model, tok, 8)
    model.eval()
    a = fmri_to_fmri(np.array([[1, 2, 3], [4, 5, 6]]), vocab.first_code_id, vocab.open_id, vocab.close_id)
    b = text_to_text(np.array(tok("global efficiency")["input_ids"][1:-1]), tok.bos_token_id, tok.eos_token_id)
    packed = {k: torch.from_numpy(v) for k, v in pack([a, b], seq_len=len(a) + len(b) + 2, pad_id=tok.pad_token_id).items()}
    mask = attention_mask(packed["segments"], packed["groups"])
    with torch.no_grad():
        joint = model(input_ids=packed["ids"], attention_mask=mask, position_ids=packed["positions"]).logits[0]
        for ex, start in ((a, 0), (b, len(a))):
            ids = torch.from_numpy(ex.ids)[None]
            g = torch.from_numpy(ex.groups)[None]
            alone = model(input_ids=ids, attention_mask=attention_mask(torch.ones_like(g), g),
                          position_ids=torch.from_numpy(ex.positions)[None]).logits[0]
            torch.testing.assert_close(joint[start : start + len(ex)], alone, atol=1e-4, rtol=1e-4)


def test_objective_losses_weight_each_objective_mean():
    logits = torch.zeros(1, 4, 5)
    logits[0, 0, 1] = 5.0  # confident and right for the first target
    targets = torch.tensor([[1, 2, 3, IGNORE]])
    objective = torch.tensor([[F2F, T2T, T2T, -1]])
    total, parts = objective_losses(logits, targets, objective, {F2F: 0.1, F2T: 1.0, T2T: 0.5})
    ce_uniform = torch.log(torch.tensor(5.0))
    assert set(parts) == {F2F, T2T}
    torch.testing.assert_close(parts[T2T], ce_uniform)
    assert parts[F2F] < 0.1
    torch.testing.assert_close(total, 0.1 * parts[F2F] + 0.5 * parts[T2T])


def test_feature_inputs_replace_embeddings_at_fmri_positions_only():
    model, tok, _ = load_backbone("tiny-gpt2")
    vocab = add_fmri_vocab(model, tok, 8)
    wrapped = FMRIInputLM(model, width=5, max_rois=4).eval()
    ex = fmri_to_fmri(np.array([[1, 2, 3], [4, 5, 6]]), vocab.first_code_id, vocab.open_id, vocab.close_id,
                      feats=np.random.default_rng(0).normal(size=(2, 3, 5)).astype(np.float32))
    row = {k: torch.from_numpy(v) for k, v in pack([ex], len(ex), tok.pad_token_id).items()}
    mask = attention_mask(row["segments"], row["groups"])
    with torch.no_grad():
        plain = model.eval()(input_ids=row["ids"], attention_mask=mask, position_ids=row["positions"]).logits
        no_fmri = wrapped(row["ids"], mask, row["positions"], row["feats"], torch.full_like(row["roi"], -1)).logits
        with_feats = wrapped(row["ids"], mask, row["positions"], row["feats"], row["roi"]).logits
    torch.testing.assert_close(no_fmri, plain)
    assert not torch.allclose(with_feats[0, 1], plain[0, 1])  # an fMRI position now sees its features
    torch.testing.assert_close(with_feats[0, 0], plain[0, 0])  # <fmri> sees only itself: unchanged
    assert set(wrapped.input_state()) == {"projector.0.weight", "projector.0.bias", "roi_embed.weight"}


def test_scan_vector_is_the_encoder_features_connectivity():
    from fmrilm.models.scan_token import feature_connectivity, scan_dim, scan_vector, standardiser

    rng = np.random.default_rng(0)
    base = rng.normal(size=(1, 20, 6))
    feats = np.concatenate([base, base * 2 + 1, -base, rng.normal(size=(1, 20, 6))])  # ROI 1 follows 0, ROI 2 opposes it
    conn = feature_connectivity(feats)
    np.testing.assert_allclose(np.diag(conn), 1.0, atol=1e-9)
    assert conn[0, 1] == pytest.approx(1.0) and conn[0, 2] == pytest.approx(-1.0) and abs(conn[0, 3]) < 0.3
    v = scan_vector(feats)
    assert v.shape == (scan_dim(4),) == (6,) and v.dtype == np.float32
    flat = feature_connectivity(np.ones((3, 5, 2)))  # constant features: no correlation, no NaN
    assert np.isfinite(flat).all() and not flat.any()
    with pytest.raises(ValueError, match="at least 2 time steps"):
        scan_vector(feats[:, :1])
    mean, std = standardiser(np.stack([v, v * 0 + 1]))
    assert mean.shape == std.shape == v.shape and (std >= 1e-3).all()


def test_scan_token_enters_at_the_closing_token_of_each_block():
    model, tok, _ = load_backbone("tiny-gpt2")
    vocab = add_fmri_vocab(model, tok, 8)
    dim = 6
    wrapped = FMRIInputLM(model, max_rois=4, scan_dim=dim).eval()
    codes = np.array([[1, 2, 3], [4, 5, 6]])
    ids = {"first_code_id": vocab.first_code_id, "open_id": vocab.open_id, "close_id": vocab.close_id}
    scan = np.arange(dim, dtype=np.float32)
    ex = fmri_to_text(codes, np.array([7, 8, 9]), **ids, eos_id=tok.eos_token_id, scan=scan)
    close = int(np.flatnonzero(ex.ids == vocab.close_id)[0])
    assert ex.scan_at.tolist() == [close] and ex.scan.shape == (1, dim)
    two = fmri_to_fmri(codes, **ids, scan=scan * 2)
    row = pack([ex, two], len(ex) + len(two), tok.pad_token_id)  # one row, two scan vectors
    assert row["scan"].shape == (1, 2, dim) and row["scan_pos"].tolist() == [[close, len(ex) + len(two) - 1]]
    t = {k: torch.from_numpy(v) for k, v in row.items()}
    mask = attention_mask(t["segments"], t["groups"])
    with torch.no_grad():
        plain = model.eval()(input_ids=t["ids"], attention_mask=mask, position_ids=t["positions"]).logits
        none = wrapped(t["ids"], mask, t["positions"], scan=t["scan"], scan_pos=torch.full_like(t["scan_pos"], -1)).logits
        got = wrapped(t["ids"], mask, t["positions"], scan=t["scan"], scan_pos=t["scan_pos"]).logits
    torch.testing.assert_close(none, plain)
    torch.testing.assert_close(got[0, :close], plain[0, :close])  # no fMRI token of the block sees the whole-scan vector
    assert not torch.allclose(got[0, close:len(ex)], plain[0, close:len(ex)])  # the caption does
    assert {"scan_projector.0.weight", "scan_mean", "scan_std"} <= set(wrapped.input_state())
    wrapped.scan_dropout = 0.5  # a tuning setting: masks the scan vector in training only, nothing saved
    with torch.no_grad():
        torch.testing.assert_close(wrapped(t["ids"], mask, t["positions"], scan=t["scan"], scan_pos=t["scan_pos"]).logits, got)
        wrapped.train()
        wrapped.lm.eval()  # only the wrapper in training mode: any change below is the scan vector's dropout
        dropped = wrapped(t["ids"], mask, t["positions"], scan=t["scan"], scan_pos=t["scan_pos"]).logits
        wrapped.eval()
    assert not torch.allclose(dropped[0, close:len(ex)], got[0, close:len(ex)]) and "scan_dropout" not in str(wrapped.input_state())
    wrapped.scan_dropout = 0.0
    wrapped.set_scan_scale(np.ones(dim), np.full(dim, 2.0))
    again = FMRIInputLM(model, max_rois=4, scan_dim=dim)
    again.load_input_state(wrapped.input_state())
    torch.testing.assert_close(again.scan_std, torch.full((dim,), 2.0))
    with pytest.raises(BackboneError, match="do not match"):
        FMRIInputLM(model, width=5, max_rois=4).load_input_state(wrapped.input_state())


def test_an_instruction_scan_vector_enters_where_its_answer_is_predicted():
    """Single, multi and few-shot prompts: each block's scan vector sits at the end of the last
    '### Answer:' before the next block (the query's at the prompt's last token), so the token
    that predicts an answer reads the whole-scan summary; a block without a vector moves nothing."""
    from fmrilm.data.instructions import encode, question_prompt
    from fmrilm.data.lm_sequences import fmri_part

    _, tok, _ = load_backbone("tiny-gpt2")
    vectors = {"a": np.ones(3, np.float32), "b": np.full(3, 2.0, np.float32)}

    def part(scan_id, with_scan=True):
        return fmri_part(np.array([[1, 2]]), 100, 98, 99, scan=vectors[scan_id] if with_scan else None)

    def cue_ends(ex):
        cue = tok("### Answer:", add_special_tokens=False)["input_ids"]
        return [i + len(cue) - 1 for i in range(len(ex.ids)) if ex.ids[i : i + len(cue)].tolist() == cue]

    single = encode(question_prompt("a", "What is the sex?"), "", part, tok, with_answer=False)
    assert single.scan_at.tolist() == [len(single) - 1]
    answered = encode(question_prompt("a", "What is the sex?"), " Male", part, tok)
    assert answered.scan_at.tolist() == [len(single) - 1] and answered.targets[len(single) - 1] != -100  # it predicts " Male"
    multi = encode("<scan:a>### Question: q1\n### Answer: 40\n### Question: q2\n### Answer:", "", part, tok, with_answer=False)
    assert multi.scan_at.tolist() == [cue_ends(multi)[-1]] == [len(multi) - 1]
    shots = encode(question_prompt("b", "Sex?") + " Female\n\n" + question_prompt("a", "Sex?"), "", part, tok, with_answer=False)
    assert shots.scan_at.tolist() == cue_ends(shots) and shots.scan[:, 0].tolist() == [2.0, 1.0]
    bare = encode(question_prompt("a", "Sex?"), "", lambda s: part(s, False), tok, with_answer=False)
    assert bare.scan_at is None


def test_the_scan_token_needs_per_roi_tokens(tmp_path):
    from fmrilm.config import ConfigError
    from fmrilm.train.lm import PretrainSpec, check
    from tests.test_brainmarks import tiny_export

    uri = tiny_export(tmp_path / "state", rois=8, layout="state")
    with pytest.raises(ConfigError, match="whole-brain tokens .* set scan_token=false"):
        check(PretrainSpec(tokenizer=uri, backbone={"source": "tiny-gpt2"}))
