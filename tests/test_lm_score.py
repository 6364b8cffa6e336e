"""score_texts: error-targeted sampling, masks keyed by (seed, index), batching, the curve."""

import math

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="needs the extra 'pyro_mpt[lm]'")
pytest.importorskip("tokenizers", reason="needs the extra 'pyro_mpt[lm]'")

from lm_models import CORPUS, SENTENCES, tiny_bert, word_tokenizer  # noqa: E402

from pyro_mpt.lm import (  # noqa: E402
    DiffusionTime,
    MaskedPredictor,
    StratifiedBins,
    score_texts,
    text_generator,
)
from pyro_mpt.masks import Cumulative, Exhaustive  # noqa: E402


@pytest.fixture(scope="module")
def tokenizer():
    return word_tokenizer()


@pytest.fixture(scope="module")
def predictor(tokenizer):
    return MaskedPredictor(tiny_bert(tokenizer), tokenizer)


def test_target_stderr_is_met_on_every_text_or_the_cap_says_so(predictor):
    texts = SENTENCES + [" ".join(CORPUS[i : i + 3]) for i in range(0, 24, 3)] + CORPUS[:2]
    target = 0.25
    scores = score_texts(predictor, texts, target_stderr=target, max_masks=2048, pll=False)
    for score in scores:
        assert score.target_met is True
        assert score.log_prob.stderr.item() <= target
        # Zero only where every mask was scored (D <= 6 by default): exact, not lucky.
        exact = score.num_masks == 2**score.num_tokens - 1 and score.num_tokens <= 6
        assert (score.log_prob.stderr.item() == 0) == exact
    # With 2 replicates only, many texts are above the target: more masks were drawn for them.
    fixed = score_texts(predictor, texts, pll=False)
    assert sum(s.log_prob.stderr.item() > target for s in fixed) >= 4
    assert all(a.num_masks >= b.num_masks for a, b in zip(scores, fixed, strict=True))
    assert max(s.num_masks for s in scores) > 4 * max(s.num_masks for s in fixed)
    # Per token: the target scales with D.
    per_token = score_texts(predictor, texts, target_stderr=0.05, per_token=True, pll=False)
    for score in per_token:
        assert score.target_met and score.log_prob.stderr.item() <= 0.05 * score.num_tokens
    # An unreachable target stops at the cap, never beyond it, and says so.
    capped = score_texts(predictor, texts, target_stderr=1e-4, max_masks=60, pll=False,
                         exhaustive_up_to=0)  # fmt: skip
    for score in capped:
        assert score.target_met is False
        assert score.num_masks <= 60 and score.log_prob.stderr.item() > 1e-4
        assert score.to_dict()["target_met"] is False
    # An exact scheme meets any target at once.
    [exact] = score_texts(predictor, [SENTENCES[0]], masks=Exhaustive(), target_stderr=1e-9)
    assert exact.target_met and exact.num_masks == 2**exact.num_tokens - 1


def test_target_stderr_stops_with_an_unbiased_estimate_in_reach(predictor):
    """The targeted estimate agrees with the exact score within a few of its standard errors."""
    texts = [t for t in CORPUS if len(predictor.encode(t).positions) <= 7][:10]
    exact = score_texts(predictor, texts, masks=Exhaustive(), pll=False)
    targeted = score_texts(predictor, texts, target_stderr=0.1, seed=3, pll=False,
                           exhaustive_up_to=0)  # fmt: skip
    z = [(t.log_prob.mean - e.log_prob.mean).item() / t.log_prob.stderr.item()
         for t, e in zip(targeted, exact, strict=True)]  # fmt: skip
    assert max(map(abs, z)) < 4, z


def test_masks_depend_on_seed_and_index_only(predictor):
    options = dict(seed=11, curve=True, exhaustive_up_to=0)
    whole = score_texts(predictor, CORPUS[:9], **options)
    # Any shard, in any order, with its global indices, gets the same numbers.
    shard = [7, 2, 4]
    part = score_texts(predictor, [CORPUS[i] for i in shard], indices=shard, **options)
    assert [s.to_dict() for s in part] == [whole[i].to_dict() for i in shard]
    other_seed = score_texts(predictor, CORPUS[:9], seed=12, exhaustive_up_to=0)
    assert all(a.log_prob.mean != b.log_prob.mean for a, b in zip(whole, other_seed, strict=True)
               if a.num_tokens > 1)  # fmt: skip
    enumerated = score_texts(predictor, CORPUS[:3], seed=11)
    assert [s.num_masks for s in enumerated] == [7, 63, 15]  # D = 3, 6, 4: every mask


def test_a_text_draws_its_masks_from_the_generator_of_seed_and_index(predictor, tokenizer):
    text = SENTENCES[2]  # D = 9: sampled, one stratum per size
    [score] = score_texts(predictor, [text], indices=[41], seed=11, num_masks=3, pll=False)
    masks = StratifiedBins().sample(9, num_masks=3, generator=text_generator(11, 41)).masks
    ids = torch.tensor(tokenizer(text)["input_ids"])
    by_size = {}
    for mask in masks:
        hidden = ids.clone()
        positions = mask.nonzero()[:, 0] + 1  # after [CLS]
        hidden[positions] = tokenizer.mask_token_id
        with torch.no_grad():
            log_probs = predictor.model(input_ids=hidden[None]).logits[0].log_softmax(-1)
        total = log_probs[positions, ids[positions]].double().sum().item()
        by_size.setdefault(len(positions), []).append(total / len(positions))
    assert sorted(by_size) == list(range(1, 10)) and {len(v) for v in by_size.values()} == {3}
    expected = sum(sum(values) / len(values) for values in by_size.values())
    assert score.log_prob.mean.item() == pytest.approx(expected, abs=1e-5)
    with pytest.raises(ValueError, match="indices must give one index per text"):
        score_texts(predictor, CORPUS[:3], indices=[0, 1])
    with pytest.raises(ValueError, match="index must be a non-negative integer"):
        score_texts(predictor, CORPUS[:2], indices=[0, -1])


def test_token_budget_batches_rows_without_changing_the_numbers(predictor, tokenizer):
    rows = []
    handle = predictor.model.register_forward_pre_hook(
        lambda mod, args, kwargs: rows.append(kwargs["input_ids"].shape), with_kwargs=True
    )
    try:
        small = score_texts(predictor, SENTENCES, token_budget=40, seed=1)
        budget_rows = list(rows)
        rows.clear()
        large = score_texts(predictor, SENTENCES, token_budget=10**6, seed=1)
    finally:
        handle.remove()
    assert all(r * length <= 40 for r, length in budget_rows)
    assert len(rows) == len(SENTENCES)  # one batch per text: its masks and its PLL rows
    for a, b in zip(small, large, strict=True):
        assert a.num_masks == b.num_masks and a.forward_rows == b.forward_rows
        assert a.log_prob.mean.item() == pytest.approx(b.log_prob.mean.item(), abs=1e-5)
        assert a.pseudo_log_likelihood == pytest.approx(b.pseudo_log_likelihood, abs=1e-5)


def test_curve_strata_add_up_to_the_estimate(predictor):
    text = " ".join(["the cat sat on the mat"] * 4)  # 24 tokens in 5 bins of sizes
    scheme = StratifiedBins(max_strata=5)
    [score] = score_texts(predictor, [text], masks=scheme, num_masks=6, curve=True)
    curve = score.curve
    assert score.num_tokens == curve.num_tokens == 24
    assert curve.low.tolist() == [1, 5, 10, 15, 20] and curve.high.tolist() == [4, 9, 14, 19, 24]
    widths = (curve.high - curve.low + 1).double()
    assert (widths * curve.mean).sum().item() == pytest.approx(score.log_prob.mean.item())
    assert (widths.pow(2) * curve.stderr.pow(2)).sum().sqrt().item() == pytest.approx(
        score.log_prob.stderr.item()
    )
    assert curve.rates.tolist() == pytest.approx([2.5 / 24, 7 / 24, 12 / 24, 17 / 24, 22 / 24])
    record = score.to_dict()["curve"]
    assert record["low"] == curve.low.tolist() and len(record["mean"]) == 5
    with pytest.raises(ValueError, match="curve=True needs StratifiedBins"):
        score_texts(predictor, [text], masks=Cumulative(), curve=True)


def test_diffusion_time_masks_that_hide_nothing_cost_no_forward_pass(predictor):
    [score] = score_texts(predictor, ["the cat"], masks=DiffusionTime(), num_masks=200, pll=False,
                          exhaustive_up_to=0)  # fmt: skip
    # P(nothing masked) = 1 / (D + 1) = 1/3 for D = 2.
    assert score.num_masks == 200
    assert 100 < score.forward_rows < 170
    assert math.isfinite(score.log_prob.stderr.item())


def test_bad_options_are_refused(predictor):
    for options, match in [
        ({"masks": "stratified"}, "MaskScheme"),
        ({"num_masks": 0}, "num_masks"),
        ({"max_masks": 0}, "max_masks"),
        ({"token_budget": 0}, "token_budget"),
        ({"target_stderr": 0}, "target_stderr"),
        ({"target_stderr": float("nan")}, "target_stderr"),
        ({"target_stderr": 0.1, "num_masks": 1}, "num_masks >= 2"),
        ({"per_token": 1}, "per_token"),
    ]:
        with pytest.raises((TypeError, ValueError), match=match):
            score_texts(predictor, SENTENCES[:1], **options)
    with pytest.raises(ValueError, match="seed must be a non-negative integer"):
        score_texts(predictor, SENTENCES[:1], seed=-1)
    with pytest.raises(ValueError, match="at least one text"):
        score_texts(predictor, [])
    # The mask scheme's own device: a mask drawn for CPU scoring stays on the CPU.
    assert text_generator(0, 0).device == torch.device("cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_model_on_cuda_scores_as_on_the_cpu(tokenizer):
    model = tiny_bert(tokenizer)
    options = dict(curve=True, seed=4, exhaustive_up_to=0)
    on_cpu = score_texts(MaskedPredictor(model, tokenizer), SENTENCES, **options)
    on_cuda = score_texts(MaskedPredictor(model.cuda(), tokenizer), SENTENCES, **options)
    for a, b in zip(on_cpu, on_cuda, strict=True):
        assert a.num_masks == b.num_masks  # masks come from CPU generators either way
        assert a.log_prob.mean.item() == pytest.approx(b.log_prob.mean.item(), abs=1e-3)
        assert a.pseudo_log_likelihood == pytest.approx(b.pseudo_log_likelihood, abs=1e-3)
        torch.testing.assert_close(a.curve.mean, b.curve.mean, atol=1e-3, rtol=0)
