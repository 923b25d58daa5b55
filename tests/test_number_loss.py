"""The number-token loss: number tokens found in a vocabulary, a loss that is ordinal (a near
number costs less than a far one), and its part in the LM loss."""

import numpy as np
import pytest
import torch

from fmrilm.models.fmri_lm import minilm_tokenizer
from fmrilm.models.number_loss import NumberObjective, NumberTokens, number_token_loss, number_tokens


@pytest.fixture(scope="module")
def tok():
    return minilm_tokenizer()


def _id(tok, text):
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == 1, (text, ids)
    return ids[0]


def test_number_tokens_are_the_numbers_among_the_answers(tok):
    answers = np.array([_id(tok, " 30"), _id(tok, " 40"), _id(tok, " 40"), tok.eos_token_id or tok.sep_token_id, _id(tok, " male")])
    table = number_tokens(tok, answers)
    assert sorted(table.values) == [30.0, 40.0]
    assert table.scale == pytest.approx(max(1.0, np.std([30, 40, 40])))
    assert number_tokens(tok, np.array([_id(tok, " 30"), _id(tok, " male")])) is None  # one number: nothing to regress


def test_the_loss_is_ordinal_and_zero_when_right():
    table = NumberTokens(ids=(5, 6, 7), values=(20.0, 47.0, 80.0), scale=10.0)
    target = torch.tensor([6])

    def loss_at(token):
        logits = torch.full((1, 10), -30.0)
        logits[0, token] = 30.0
        return float(number_token_loss(logits, target, table))

    assert loss_at(6) == pytest.approx(0.0, abs=1e-6)
    assert loss_at(5) < loss_at(7)  # 20 is nearer 47 than 80 is
    assert loss_at(7) == pytest.approx(((80 - 47) / 10) ** 2, rel=1e-4)
    assert loss_at(0) > loss_at(7) + 30  # a non-number answer (another task's, the end token) costs its missing number mass
    assert number_token_loss(torch.zeros(2, 10), torch.tensor([-100, 2]), table) is None  # no number target


def test_forward_loss_adds_the_number_part():
    from transformers import GPT2Config, GPT2LMHeadModel

    from fmrilm.models.fmri_lm import forward_loss

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=16, n_embd=16, n_layer=1, n_head=2, n_positions=8)).eval()
    batch = {"ids": torch.tensor([[1, 2, 3, 4]]), "targets": torch.tensor([[-100, -100, 6, 9]]),
             "groups": torch.arange(4)[None], "positions": torch.arange(4)[None], "objective": torch.zeros(1, 4, dtype=torch.long),
             "segments": torch.ones(1, 4, dtype=torch.long)}
    number = NumberObjective(objective=0, tokens=NumberTokens((5, 6, 7), (1.0, 2.0, 3.0), 1.0), weight=2.0, part=1)
    plain, parts = forward_loss(model, batch, {0: 1.0})
    both, parts2 = forward_loss(model, batch, {0: 1.0}, number)
    assert set(parts) == {0} and set(parts2) == {0, 1}
    assert float(both) == pytest.approx(float(plain) + 2.0 * float(parts2[1]), rel=1e-5)
    assert NumberObjective.from_dict(number.as_dict()) == number


def test_the_number_objective_regresses_one_task_only(tok):
    """The number objective is built from the age answers of the packed rows (a number in
    another task's answer is not regressed), and is off at weight 0."""
    from fmrilm.data.instructions import TASKS
    from fmrilm.models.number_loss import number_objective

    age, sex = TASKS.index("age"), TASKS.index("sex")
    targets = np.array([[-100, _id(tok, " 30"), 0, -100, _id(tok, " 99")], [-100, _id(tok, " 50"), 0, -100, -100]])
    objective = np.array([[-1, age, age, -1, sex], [-1, age, age, -1, -1]])
    got = number_objective({"targets": targets, "objective": objective}, tok, age, 1.5, part=len(TASKS))
    assert got.objective == age and got.weight == 1.5 and got.part == len(TASKS)
    assert sorted(got.tokens.values) == [30.0, 50.0]
    assert number_objective({"targets": targets, "objective": objective}, tok, age, 0.0, part=len(TASKS)) is None
