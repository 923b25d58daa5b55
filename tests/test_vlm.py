"""The VLM baseline's pure parts: scans rendered as images with a colour scale fitted on training
scans only, tiny VLMs of two families built from configs in code, rows with the loss on the answer
only, LoRA on the language model only, choices scored and answers generated."""

import numpy as np
import pytest
import torch

from fmrilm.features import images
from fmrilm.models import vlm


def _scans(n=4, rois=12, time=80, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((rois, time)) for _ in range(n)]


def test_images_have_one_size_and_a_scale_from_training_scans_only():
    train, test = _scans(), [np.random.default_rng(9).standard_normal((12, 200)) * 50]
    scale = images.fit_scale(train)
    assert scale.carpet[0] < 0 < scale.carpet[1] and -1 <= scale.fc[0] < scale.fc[1] <= 1
    assert images.fit_scale(train) == scale and images.fit_scale(train + test) != scale  # a test scan would move it
    assert images.ImageScale.from_dict(scale.as_dict()) == scale
    for view, size in (("carpet", (16, 16)), ("fc", (16, 16)), ("both", (32, 16))):
        assert images.render(train[0], view, scale, 16).size == size  # width, height
        assert images.render(test[0], view, scale, 16).size == size  # another length, the same image size
    both = np.asarray(images.render(train[0], "both", scale, 16))
    assert (both[:, :16] == images.carpet(train[0], scale, 16)).all() and (both[:, 16:] == images.fc_heatmap(train[0], scale, 16)).all()
    with pytest.raises(ValueError, match="unknown image view"):
        images.render(train[0], "movie", scale, 16)


def test_the_colours_follow_the_signal():
    x = np.zeros((2, 40))
    x[0] = np.sin(np.linspace(0, 12, 40))
    x[1] = x[0]  # perfectly coupled
    scale = images.ImageScale((-2.0, 2.0), (-1.0, 1.0))
    fc = images.fc_heatmap(x, scale, 2)
    assert int(fc[0, 1, 0]) > int(fc[0, 1, 2]) + 50  # off-diagonal +1: red
    assert (fc[0, 0] > 200).all()  # the diagonal is set to 0: white


@pytest.mark.parametrize("name", vlm.BUILTIN)
def test_a_tiny_vlm_trains_on_the_answer_only_with_lora_on_its_language_model(name):
    model, processor, info = vlm.load_vlm(name, image_size=16)
    family = vlm.family_of(model)
    assert not info["pretrained"] and info["family"] in vlm.FAMILIES
    image = images.render(_scans(1)[0], "both", images.fit_scale(_scans()), 16)
    row = vlm.encode(processor, family, image, "How old is this participant, in years?", "42", 96, objective=3)
    answer = processor.tokenizer(" 42", add_special_tokens=False)["input_ids"] + [processor.tokenizer.eos_token_id]
    assert row["ids"].shape == row["targets"].shape == row["objective"].shape == (96,)
    assert list(row["targets"][row["targets"] != -100]) == answer  # the answer and end of sequence, nothing of the prompt
    assert set(row["objective"][row["targets"] != -100]) == {3} and set(row["objective"][row["targets"] == -100]) == {-1}
    first = int(np.flatnonzero(row["targets"] != -100)[0])
    assert row["ids"][first + 1] == answer[0]  # the target at a position is the next token
    assert processor.tokenizer.eos_token_id not in row["ids"][: first + 1]  # no end of sequence before the answer
    with pytest.raises(ValueError, match="does not fit seq_len"):
        vlm.encode(processor, family, image, "How old?", "42", 8)

    targets = vlm.language_targets(model)
    assert targets and not any(s in t for t in targets for s in vlm.VISION_SIDE)
    from fmrilm.models.lora import LoraSpec
    from fmrilm.train.vlm import with_lora

    tuned = with_lora(model, LoraSpec(enabled=True, r=4, alpha=8, dropout=0.0))
    trainable = [n for n, p in tuned.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable) and not any(s in n for n in trainable for s in ("vision", "projector", "connector"))

    batch = {k: torch.from_numpy(np.stack([v, v])) for k, v in row.items()}
    loss_fn = vlm.vlm_loss(family)
    opt = torch.optim.AdamW([p for p in tuned.parameters() if p.requires_grad], lr=3e-2)
    first_loss, parts = loss_fn(tuned, batch, {3: 1.0})
    assert set(parts) == {3}
    for _ in range(15):
        loss, _ = loss_fn(tuned, batch, {3: 1.0})
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < first_loss.item() - 0.5  # it learns the answer (its first token; the end of sequence comes slower)
    tuned.eval()
    assert vlm.generate_answer(tuned, family, processor, image, "How old is this participant, in years?").startswith("42")
    lp = vlm.answer_logprobs(tuned, family, processor, image, "How old is this participant, in years?", ["42", "17"])
    assert lp[0] > lp[1]


def test_unsupported_sources_fail_with_one_line(tmp_path):
    from fmrilm.models.fmri_lm import BackboneError

    with pytest.raises(BackboneError, match="text-only LM"):
        vlm.load_vlm("tiny-gpt2")
    with pytest.raises(BackboneError, match="not a Hugging Face model folder"):
        vlm.load_vlm(str(tmp_path))
    from transformers import GPT2Config

    GPT2Config(n_layer=1).save_pretrained(tmp_path)  # a folder of another family: refused from its config, no weights read
    with pytest.raises(BackboneError, match="VLM family 'gpt2' is not supported"):
        vlm.load_processor(str(tmp_path))
    from fmrilm.train.vlm import VLMSpec, check

    processor, family, info = check(VLMSpec(model="tiny-idefics3", render={"size": 16}))  # the driver's check: no weights
    assert family.nested_images and info == {"source": "tiny-idefics3", "family": "idefics3", "pretrained": False}
    with pytest.raises(BackboneError, match="no language-model modules"):
        check(VLMSpec(model="tiny-llava", lora={"enabled": True, "target_modules": ["c_attn"]}))
    assert vlm.lora_pattern(["q_proj"]).endswith(r"\.(q_proj)$")


def test_the_image_reaches_the_answer():
    """Shown a class planted as a colour, a tiny VLM tuned whole learns it from the image alone
    (the question is the same for every image): the pixels reach the answer."""
    from PIL import Image

    rng = np.random.default_rng(0)
    model, processor, _ = vlm.load_vlm("tiny-llava", image_size=32)
    family = vlm.family_of(model)
    labels = rng.integers(0, 2, 32)
    shown = []
    for label in labels:
        pixels = (rng.random((32, 64, 3)) * 60).astype(np.uint8)
        pixels[..., 0 if label else 2] += 150  # red or blue
        shown.append(Image.fromarray(pixels))
    words = ["Female", "Male"]
    rows = [vlm.encode(processor, family, im, "What is the sex?", words[y], 64) for im, y in zip(shown, labels)]
    data = {k: torch.from_numpy(np.stack([r[k] for r in rows])) for k in rows[0]}
    loss_fn, opt = vlm.vlm_loss(family), torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(40):
        pick = torch.from_numpy(rng.choice(len(rows), 16, replace=False))
        loss, _ = loss_fn(model, {k: v[pick] for k, v in data.items()}, {0: 1.0})
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    said = [vlm.answer_logprobs(model, family, processor, im, "What is the sex?", words).argmax() for im in shown]
    assert np.mean(np.array(said) == labels) >= 0.9


def test_llama_vision_s_family_takes_the_same_path():
    """Mllama (Llama-3.2-Vision, the poster's LLaMA): cross-attention masks padded with the row,
    tiles batched, the loss on the answer, choices scored, LoRA only on the language model."""
    from transformers import MllamaConfig, MllamaForConditionalGeneration, MllamaImageProcessor, MllamaProcessor

    from fmrilm.models.fmri_lm import minilm_tokenizer

    tok = minilm_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<|image|>"]})
    processor = MllamaProcessor(image_processor=MllamaImageProcessor(size={"height": 32, "width": 32}, max_image_tiles=4), tokenizer=tok,
                                chat_template=vlm.CHAT_TEMPLATE.replace("<image>", "<|image|>"))
    torch.manual_seed(0)
    model = MllamaForConditionalGeneration(MllamaConfig(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_global_layers=1, attention_heads=2, image_size=32,
                           patch_size=16, max_num_tiles=4, vision_output_dim=64, intermediate_layers_indices=[0]),
        text_config=dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, cross_attention_layers=[1], pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id),
        image_token_index=tok.convert_tokens_to_ids("<|image|>")))
    family = vlm.family_of(model)
    image = images.render(_scans(1)[0], "both", images.fit_scale(_scans()), 32)
    row = vlm.encode(processor, family, image, "How old is this participant, in years?", "42", 64, objective=3)
    assert row["cross_attention_mask"].shape[0] == 64 and row["ids"].shape == (64,)
    batch = {k: torch.from_numpy(np.stack([v, v])) for k, v in row.items()}
    loss, parts = vlm.vlm_loss(family)(model, batch, {3: 1.0})
    assert set(parts) == {3} and torch.isfinite(loss)
    assert vlm.answer_logprobs(model, family, processor, image, "How old is this participant, in years?", ["42", "17"]).shape == (2,)
    targets = vlm.language_targets(model)
    assert targets and all(t.startswith("model.language_model.") for t in targets)
