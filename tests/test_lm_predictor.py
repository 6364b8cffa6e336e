"""Any masked predictor, one API: *ForMaskedLM, a callable, an nn.Module with GPT-2's tokenizer.

Every number is checked against a hand-written computation: mask the positions, call the model,
take the log-softmax, sum; over every mask for the exact score.
"""

import itertools
import math
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="needs the extra 'pyro_mpt[lm]'")
pytest.importorskip("tokenizers", reason="needs the extra 'pyro_mpt[lm]'")

from lm_models import SENTENCES, TinyDenoiser, gpt2_tokenizer, tiny_bert, word_tokenizer  # noqa: E402

from pyro_mpt.lm import MaskedPredictor, StratifiedBins, score_texts  # noqa: E402
from pyro_mpt.masks import Cumulative, Exhaustive  # noqa: E402
from pyro_mpt.mlm import mlm_curve, mlm_score  # noqa: E402


@pytest.fixture(scope="module")
def tokenizer():
    return word_tokenizer()


@pytest.fixture(scope="module")
def bert(tokenizer):
    return tiny_bert(tokenizer)


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    return gpt2_tokenizer(tmp_path_factory.mktemp("gpt2"))


def hidden_sum(logits_of, ids: torch.Tensor, hide: list[int], mask_id: int) -> float:
    """sum over the positions ``hide`` of log p(x_j | the rest), by hand."""
    masked = ids.clone()
    masked[hide] = mask_id
    with torch.no_grad():
        log_probs = logits_of(masked[None])[0].log_softmax(-1)
    return log_probs[hide, ids[hide]].double().sum().item()


def brute_force(logits_of, ids, positions: list[int], mask_id: int) -> float:
    """sum_m mean_{|M| = m} (1/m) sum_{j in M} log p(x_j | x_R), over every mask of positions."""
    return sum(
        sum(hidden_sum(logits_of, ids, list(subset), mask_id) / m
            for subset in itertools.combinations(positions, m))
        / math.comb(len(positions), m)
        for m in range(1, len(positions) + 1)
    )  # fmt: skip


def test_gpt2_tokenizer_without_mask_token_and_a_plain_module(gpt2):
    assert gpt2.mask_token_id is None and gpt2.pad_token_id is None
    mask_id = len(gpt2)  # appended to the vocabulary, as a diffusion LM on GPT-2's tokenizer does
    module = TinyDenoiser(len(gpt2) + 1).train()  # dropout on: scoring must switch it off
    predictor = MaskedPredictor(module, gpt2, mask_token_id=mask_id)
    # "<|endoftext|>" typed in the text is GPT-2's only special token: context, never scored.
    text = "the cat<|endoftext|> sat on the mat"
    ids = torch.tensor(gpt2(text)["input_ids"])
    eos = gpt2.convert_tokens_to_ids("<|endoftext|>")
    positions = [j for j in range(len(ids)) if ids[j] != eos]
    assert len(positions) == len(ids) - 1 >= 4
    seen = []
    handle = module.register_forward_pre_hook(lambda mod, args: seen.append(args[0].clone()))
    try:
        [exact] = score_texts(predictor, [text], masks=Exhaustive())
    finally:
        handle.remove()
    assert module.training  # the mode is put back
    module.eval()
    expected = brute_force(module, ids, positions, mask_id)
    pll = sum(hidden_sum(module, ids, [j], mask_id) for j in positions)
    assert exact.num_tokens == len(positions)
    assert exact.log_prob.mean.item() == pytest.approx(expected, abs=1e-5)
    assert exact.log_prob.stderr.item() == 0
    assert exact.pseudo_log_likelihood == pytest.approx(pll, abs=1e-5)
    rows = torch.cat(seen)
    assert (rows[:, ids == eos] == eos).all()  # the special token is never hidden
    assert set(rows[rows != ids].tolist()) == {mask_id}
    # A module is scored with a stochastic scheme too, and a string of specials is refused.
    [sampled] = score_texts(predictor, [text], masks=Cumulative(), num_masks=64, seed=1)
    assert abs(sampled.log_prob.mean.item() - expected) < 4 * sampled.log_prob.stderr.item()
    with pytest.raises(ValueError, match="no tokens to score"):
        score_texts(predictor, ["<|endoftext|>"])


def test_a_masked_lm_gives_identical_results_as_a_model_and_as_a_callable(bert, tokenizer):
    def logits(input_ids):
        return bert(input_ids=input_ids).logits

    as_model = MaskedPredictor(bert, tokenizer)
    as_callable = MaskedPredictor(logits, tokenizer, mask_token_id=tokenizer.mask_token_id)
    options = dict(curve=True, seed=5, masks=StratifiedBins(max_strata=4), num_masks=3)
    records = [s.to_dict() for s in score_texts(as_model, SENTENCES, **options)]
    assert records == [s.to_dict() for s in score_texts(as_callable, SENTENCES, **options)]
    # The same through the older entry points, mlm_score and mlm_curve.
    for function, extra in ((mlm_score, {"num_masks": 4}), (mlm_curve, {"masks_per_rate": 3})):
        one = function(bert, tokenizer, SENTENCES, generator=torch.Generator().manual_seed(1),
                       progress=False, **extra)  # fmt: skip
        two = function(logits, tokenizer, SENTENCES, generator=torch.Generator().manual_seed(1),
                       progress=False, mask_token_id=tokenizer.mask_token_id, **extra)  # fmt: skip
        for a, b in zip(torch.utils._pytree.tree_leaves(one), torch.utils._pytree.tree_leaves(two),
                        strict=True):  # fmt: skip
            assert torch.equal(torch.as_tensor(a), torch.as_tensor(b))
    # And mlm_score's exact score and PLL are score_texts' (to float precision: other batches).
    old = mlm_score(bert, tokenizer, SENTENCES[:2], masks=Exhaustive(), progress=False)
    new = score_texts(as_model, SENTENCES[:2], masks=Exhaustive())
    for n, score in enumerate(new):
        assert score.log_prob.mean.item() == pytest.approx(old.log_prob.mean[n].item(), abs=1e-5)
        assert score.pseudo_log_likelihood == pytest.approx(
            old.pseudo_log_likelihood[n].item(), abs=1e-5
        )


def test_conditional_scoring_keeps_the_prompt_visible(bert, tokenizer):
    prompt, continuation = "the quick brown", " fox jumps over"
    predictor = MaskedPredictor(bert, tokenizer)
    ids = torch.tensor(tokenizer(prompt + continuation)["input_ids"])
    tokens = tokenizer.convert_ids_to_tokens(ids.tolist())
    assert tokens == ["[CLS]", "the", "quick", "brown", "fox", "jumps", "over", "[SEP]"]
    scored = [4, 5, 6]
    seen = []
    handle = bert.register_forward_pre_hook(
        lambda mod, args, kwargs: seen.append(kwargs["input_ids"].clone()), with_kwargs=True
    )
    try:
        [exact] = score_texts(predictor, [(prompt, continuation)], masks=Exhaustive())
    finally:
        handle.remove()
    rows = torch.cat(seen)
    assert (rows[:, :4] == ids[:4]).all() and (rows[:, -1] == ids[-1]).all()  # prompt visible
    assert (exact.num_tokens, exact.prompt_tokens) == (3, 3)
    expected = brute_force(lambda x: bert(input_ids=x).logits, ids, scored,
                           tokenizer.mask_token_id)  # fmt: skip
    assert exact.log_prob.mean.item() == pytest.approx(expected, abs=1e-5)
    pll = sum(hidden_sum(lambda x: bert(input_ids=x).logits, ids, [j], tokenizer.mask_token_id)
              for j in scored)  # fmt: skip
    assert exact.pseudo_log_likelihood == pytest.approx(pll, abs=1e-5)
    # Trailing whitespace of the prompt belongs to the continuation (lm-evaluation-harness).
    moved = predictor.encode((prompt + " ", continuation.strip()))
    split = predictor.encode((prompt, continuation))
    assert torch.equal(moved.input_ids, split.input_ids)
    assert torch.equal(moved.positions, split.positions)
    assert moved.prompt_tokens == split.prompt_tokens
    # log p(continuation | prompt) is not log p(continuation): the prompt is context.
    [alone] = score_texts(predictor, [continuation.strip()], masks=Exhaustive())
    assert alone.num_tokens == 3 and alone.prompt_tokens == 0
    assert abs(alone.log_prob.mean.item() - expected) > 1e-3
    with pytest.raises(ValueError, match="texts\\[0\\] has no tokens to score .*continuation"):
        score_texts(predictor, [(prompt, "  ")])


def test_gpt2_style_conditional_split(gpt2):
    predictor = MaskedPredictor(TinyDenoiser(len(gpt2) + 1), gpt2, mask_token_id=len(gpt2))
    text = predictor.encode(("the cat", " sat on the mat"))
    prompt_ids = gpt2("the cat")["input_ids"]
    assert text.prompt_tokens == len(prompt_ids)
    assert text.input_ids[: len(prompt_ids)].tolist() == prompt_ids
    assert text.positions.tolist() == list(range(len(prompt_ids), len(text.input_ids)))


def test_shifted_logits_are_shifted_back(bert, tokenizer):
    """Dream-style predictors output at position i the logits of token i + 1."""

    def shifted(input_ids):
        logits = bert(input_ids=input_ids).logits
        return torch.cat([logits[:, 1:], logits[:, -1:]], dim=1)

    mask_id = tokenizer.mask_token_id
    plain = score_texts(MaskedPredictor(bert, tokenizer), SENTENCES, seed=2)
    fixed = score_texts(MaskedPredictor(shifted, tokenizer, mask_id, shift_logits=True),
                        SENTENCES, seed=2)  # fmt: skip
    assert [s.to_dict() for s in plain] == [s.to_dict() for s in fixed]
    unfixed = score_texts(MaskedPredictor(shifted, tokenizer, mask_id), SENTENCES, seed=2)
    assert [s.to_dict() for s in plain] != [s.to_dict() for s in unfixed]


def test_bad_predictors_and_texts_are_refused(bert, tokenizer, gpt2):
    with pytest.raises(TypeError, match="masked language model.*pass mask_token_id"):
        MaskedPredictor(TinyDenoiser(10), tokenizer)
    with pytest.raises(ValueError, match="tokenizer must define a mask token"):
        MaskedPredictor(tiny_bert(tokenizer), gpt2)
    with pytest.raises(TypeError, match="callable"):
        MaskedPredictor("not a model", tokenizer, mask_token_id=4)
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="mask_token_id"):
            MaskedPredictor(bert, tokenizer, mask_token_id=bad)
    wrong_shape = MaskedPredictor(lambda ids: ids.float(), tokenizer, mask_token_id=4)
    with pytest.raises(TypeError, match="logits of shape"):
        score_texts(wrong_shape, ["the cat"])
    too_few = MaskedPredictor(lambda ids: torch.zeros(*ids.shape, 5), tokenizer, mask_token_id=4)
    with pytest.raises(ValueError, match="returns 5 logits per position"):
        score_texts(too_few, ["the cat"])
    predictor = MaskedPredictor(bert, tokenizer)
    with pytest.raises(TypeError, match="wrap a single text or pair in a list"):
        score_texts(predictor, ("the cat", " sat"))
    with pytest.raises(TypeError, match=r"texts\[1\] must be a string or a \(prompt"):
        score_texts(predictor, ["the cat", ("a", "b", "c")])
    with pytest.raises(ValueError, match="accepts at most 32"):
        score_texts(predictor, [" ".join(["cat"] * 40)])
    with pytest.raises(ValueError, match="max_length"):
        MaskedPredictor(bert, tokenizer, max_length=0)
    with pytest.raises(FileNotFoundError, match="not a local checkpoint directory"):
        MaskedPredictor.from_pretrained("/nonexistent/checkpoint")


def test_the_package_imports_without_transformers_and_names_the_extra():
    code = (
        "import sys\n"
        "sys.modules['transformers'] = None\n"
        "sys.modules['tokenizers'] = None\n"
        "import pyro_mpt.lm as lm\n"
        "try:\n"
        "    lm.MaskedPredictor.from_pretrained('.')\n"
        "except ImportError as exc:\n"
        "    assert \"pyro_mpt[lm]\" in str(exc), exc\n"
        "else:\n"
        "    raise AssertionError('no ImportError')\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
