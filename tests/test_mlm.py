"""Masked language models: the MPT curve and score against hand-written leave-out computations."""

import itertools
import math
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip(
    "transformers", reason="pyro_mpt.mlm needs the optional extra: pip install 'pyro_mpt[mlm]'"
)
pytest.importorskip("tokenizers", reason="pyro_mpt.mlm needs the optional extra 'pyro_mpt[mlm]'")

from pyro_mpt.masks import Cumulative, Exhaustive  # noqa: E402
from pyro_mpt.mlm import (  # noqa: E402
    MLMCurve,
    mlm_curve,
    mlm_score,
    train_wordpiece_tokenizer,
    word_level_tokenizer,
)

SENTENCES = [
    "the cat sat on the mat",
    "a dog ran in the park",
    "the quick brown fox jumps over the lazy dog",
    "birds sing in the morning and the cat sleeps",
]


@pytest.fixture(scope="module")
def tokenizer():
    return train_wordpiece_tokenizer(SENTENCES, vocab_size=120)


def tiny_bert(tokenizer, seed: int = 0, **overrides):
    # initializer_range=0.02 keeps the tied output embeddings small: the untrained logits have a
    # standard deviation of about 0.02 * sqrt(hidden_size) = 0.1, so every token gets about 1/V.
    settings = dict(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=32,
        initializer_range=0.02,
        pad_token_id=tokenizer.pad_token_id,
    )
    config = transformers.BertConfig(**{**settings, **overrides})
    torch.manual_seed(seed)
    return transformers.BertForMaskedLM(config).eval()


@pytest.fixture(scope="module")
def model(tokenizer):
    """Untrained but not uniform: scaled-up output embeddings make the conditionals differ."""
    return tiny_bert(tokenizer, initializer_range=0.2)


def hidden_log_probs(model, tokenizer, text: str, hide: list[int]) -> torch.Tensor:
    """log p(x_j | x_R) for the j in ``hide`` (indices among the non-special tokens), by hand."""
    ids = torch.tensor(tokenizer(text)["input_ids"])
    positions = torch.arange(1, len(ids) - 1)[hide]  # [CLS] text [SEP]
    masked = ids.clone()
    masked[positions] = tokenizer.mask_token_id
    with torch.no_grad():
        log_probs = model(input_ids=masked[None]).logits[0].log_softmax(-1)
    return log_probs[positions, ids[positions]].double()


def num_tokens(tokenizer, text: str) -> int:
    return len(tokenizer(text)["input_ids"]) - 2


def pseudo_log_likelihood(model, tokenizer, text: str) -> float:
    size = num_tokens(tokenizer, text)
    return sum(hidden_log_probs(model, tokenizer, text, [j]).item() for j in range(size))


def brute_force_log_prob(model, tokenizer, text: str) -> float:
    """sum_m mean_{|M|=m} (1/m) sum_{j in M} log p(x_j | x_R) over every mask."""
    size = num_tokens(tokenizer, text)
    total = 0.0
    for m in range(1, size + 1):
        subsets = list(itertools.combinations(range(size), m))
        scores = [hidden_log_probs(model, tokenizer, text, list(s)).sum() / m for s in subsets]
        total += torch.stack(scores).mean().item()
    return total


def test_smallest_rate_is_the_pseudo_log_likelihood(model, tokenizer):
    curve = mlm_curve(model, tokenizer, SENTENCES, masks_per_rate=16, progress=False)
    expected = torch.tensor(
        [pseudo_log_likelihood(model, tokenizer, t) for t in SENTENCES], dtype=torch.float64
    )
    sizes = torch.tensor([num_tokens(tokenizer, t) for t in SENTENCES])
    assert curve.num_tokens.tolist() == sizes.tolist()
    assert curve.sizes[0].tolist() == [1] * len(SENTENCES)
    torch.testing.assert_close(curve.mean[0], expected / sizes, atol=1e-5, rtol=0)
    assert (curve.stderr[0] == 0).all()  # all D single-token masks were enumerated
    score = mlm_score(model, tokenizer, SENTENCES, num_masks=2, progress=False)
    torch.testing.assert_close(score.pseudo_log_likelihood, expected, atol=1e-5, rtol=0)


def test_exhaustive_score_and_full_curve_area_are_exact(model, tokenizer):
    text = "the cat sat on the mat"
    size = num_tokens(tokenizer, text)
    assert 3 <= size <= 8
    expected = brute_force_log_prob(model, tokenizer, text)
    score = mlm_score(model, tokenizer, [text], masks=Exhaustive(), progress=False)
    assert score.log_prob.mean.item() == pytest.approx(expected, abs=1e-5)
    assert score.log_prob.stderr.item() == 0
    # Every size, with more masks per rate than C(D, m): each term is exact, and so is the area.
    rates = [m / size for m in range(1, size + 1)]
    curve = mlm_curve(model, tokenizer, [text], rates=rates, masks_per_rate=100, progress=False)
    assert curve.sizes[:, 0].tolist() == list(range(1, size + 1))
    assert curve.area().mean.item() == pytest.approx(expected, abs=1e-5)
    # The m = D term has no context but [CLS] [SEP] and positions.
    everything = hidden_log_probs(model, tokenizer, text, list(range(size))).mean().item()
    assert curve.mean[-1, 0].item() == pytest.approx(everything, abs=1e-5)


def test_cumulative_score_is_unbiased(model, tokenizer):
    text = "the cat sat on the mat"
    exact = mlm_score(model, tokenizer, [text], masks=Exhaustive(), progress=False).log_prob
    generator = torch.Generator().manual_seed(0)
    estimate = mlm_score(
        model, tokenizer, [text], masks=Cumulative(), num_masks=400, generator=generator,
        batch_size=128, progress=False,
    ).log_prob  # fmt: skip
    assert 0 < estimate.stderr.item() < 0.1 * abs(exact.mean.item())
    assert abs(estimate.mean.item() - exact.mean.item()) < 4 * estimate.stderr.item()


def test_untrained_model_scores_minus_log_vocab_at_every_rate(tokenizer):
    model = tiny_bert(tokenizer)  # initializer_range=0.02: near-uniform predictions
    curve = mlm_curve(model, tokenizer, SENTENCES, masks_per_rate=4, progress=False)
    log_vocab = math.log(len(tokenizer))
    assert (curve.mean + log_vocab).abs().max().item() < 0.2
    assert (curve.average().mean + log_vocab).abs().max().item() < 0.2


def test_padding_batching_and_dropout_do_not_change_scores(model, tokenizer):
    def curve(batch_size):
        return mlm_curve(
            model, tokenizer, SENTENCES, rates=[0.2, 0.5, 0.9], masks_per_rate=5,
            batch_size=batch_size, generator=torch.Generator().manual_seed(3), progress=False,
        )  # fmt: skip

    one_by_one = curve(1)
    model.train()  # scoring must switch dropout off, and put the mode back
    try:
        padded = curve(64)
        assert model.training
    finally:
        model.eval()
    torch.testing.assert_close(one_by_one.mean, padded.mean, atol=1e-5, rtol=0)
    torch.testing.assert_close(one_by_one.stderr, padded.stderr, atol=1e-5, rtol=0)


def test_hand_checked_random_masks(model, tokenizer):
    """A sampled rate equals the mean over the very masks the generator draws (same seed)."""
    from pyro_mpt.masks import masks_of_sizes

    text = SENTENCES[2]
    size = num_tokens(tokenizer, text)
    rate, draws = 0.5, 6
    m = round(rate * size)
    curve = mlm_curve(
        model, tokenizer, [text], rates=[rate], masks_per_rate=draws,
        generator=torch.Generator().manual_seed(7), progress=False,
    )  # fmt: skip
    masks = masks_of_sizes(torch.full((draws,), m), size, torch.Generator().manual_seed(7))
    scores = torch.stack(
        [hidden_log_probs(model, tokenizer, text, mask.nonzero()[:, 0].tolist()).mean()
         for mask in masks]
    )  # fmt: skip
    assert curve.mean[0, 0].item() == pytest.approx(scores.mean().item(), abs=1e-5)
    assert curve.stderr[0, 0].item() == pytest.approx(
        (scores.std() / math.sqrt(draws)).item(), abs=1e-6
    )


def test_special_tokens_are_never_masked_and_nothing_is_padded(model, tokenizer):
    seen = []

    def record(module, args, kwargs):
        seen.append((kwargs["input_ids"].clone(), kwargs["attention_mask"].clone()))

    handle = model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        mlm_curve(model, tokenizer, SENTENCES, rates=[0.99], masks_per_rate=2, progress=False)
    finally:
        handle.remove()
    # A batch holds the masks of one text: every row has the text's length, nothing is padded.
    assert len(seen) == len(SENTENCES)
    for (ids, attention), text in zip(seen, SENTENCES, strict=True):
        assert ids.shape[1] == len(tokenizer(text)["input_ids"])
        assert (attention == 1).all()
        assert (ids[:, 0] == tokenizer.cls_token_id).all()
        assert (ids[:, -1] == tokenizer.sep_token_id).all()
        # At 99% every real token is hidden.
        assert (ids[:, 1:-1] == tokenizer.mask_token_id).all()


def test_special_tokens_typed_in_the_text_are_context_not_scored(model, tokenizer):
    # The characters "[MASK]" and "[SEP]" in a text are parsed to the special ids, but the
    # tokenizer's special_tokens_mask flags only the [CLS] and [SEP] it added itself.
    text = "the cat [MASK] on the [SEP] mat"
    ids = tokenizer(text)["input_ids"]
    tokens = ["[CLS]", "the", "cat", "[MASK]", "on", "the", "[SEP]", "mat", "[SEP]"]
    assert tokenizer.convert_ids_to_tokens(ids) == tokens
    content = [1, 2, 4, 5, 7]  # positions of the, cat, on, the, mat

    def hidden(positions):
        """sum over the hidden positions of log p(x_j | rest), rest including [MASK] and [SEP]."""
        masked = torch.tensor(ids)
        masked[positions] = tokenizer.mask_token_id
        with torch.no_grad():
            log_probs = model(input_ids=masked[None]).logits[0].log_softmax(-1)
        return log_probs[positions, torch.tensor(ids)[positions]].double().sum().item()

    pll = sum(hidden([j]) for j in content)
    exact = sum(
        sum(hidden(list(subset)) / m for subset in itertools.combinations(content, m))
        / math.comb(len(content), m)
        for m in range(1, len(content) + 1)
    )
    score = mlm_score(model, tokenizer, [text], masks=Exhaustive(), progress=False)
    assert score.num_tokens.tolist() == [5]
    assert score.pseudo_log_likelihood.item() == pytest.approx(pll, abs=1e-5)
    assert score.log_prob.mean.item() == pytest.approx(exact, abs=1e-5)
    curve = mlm_curve(model, tokenizer, [text], rates=[0.2], masks_per_rate=5, progress=False)
    assert curve.num_tokens.tolist() == [5]
    assert curve.mean[0, 0].item() == pytest.approx(pll / 5, abs=1e-5)
    # [UNK] (an unknown word) is special too, as in Hugging Face's masked-LM data collator; a
    # text of special tokens only has nothing to score.
    assert tokenizer.tokenize("the zebra cat") == ["the", "[UNK]", "cat"]
    unknown = mlm_curve(model, tokenizer, ["the zebra cat"], rates=[1.0], progress=False)
    assert unknown.num_tokens.tolist() == [2]
    with pytest.raises(ValueError, match="special tokens only"):
        mlm_score(model, tokenizer, ["[MASK] [SEP]"], progress=False)


def test_bad_input_is_refused(model, tokenizer):
    with pytest.raises(ValueError, match=r"texts\[1\] has no tokens to score"):
        mlm_curve(model, tokenizer, ["the cat", ""], progress=False)
    with pytest.raises(ValueError, match="no tokens to score"):
        mlm_score(model, tokenizer, ["   "], progress=False)
    with pytest.raises(ValueError, match="at least one text"):
        mlm_curve(model, tokenizer, [], progress=False)
    with pytest.raises(TypeError, match="list of strings"):
        mlm_curve(model, tokenizer, "the cat", progress=False)
    with pytest.raises(ValueError, match="accepts at most 32"):
        mlm_curve(model, tokenizer, [" ".join(["cat"] * 40)], progress=False)
    for rates in ([0.0], [1.5], [-0.1], [float("nan")], [], ["a"]):
        with pytest.raises(ValueError, match="rates"):
            mlm_curve(model, tokenizer, SENTENCES, rates=rates, progress=False)
    with pytest.raises(ValueError, match="masks_per_rate"):
        mlm_curve(model, tokenizer, SENTENCES, masks_per_rate=0, progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        mlm_score(model, tokenizer, SENTENCES, batch_size=0, progress=False)
    with pytest.raises(TypeError, match="MaskScheme"):
        mlm_score(model, tokenizer, SENTENCES, masks="cumulative", progress=False)
    encoder = transformers.BertModel(model.config)
    classifier = transformers.BertForSequenceClassification(model.config)
    for not_mlm in (encoder, classifier, torch.nn.Linear(2, 2)):
        with pytest.raises(TypeError, match="masked language model"):
            mlm_curve(not_mlm, tokenizer, SENTENCES, progress=False)
        with pytest.raises(TypeError, match="masked language model"):
            mlm_score(not_mlm, tokenizer, SENTENCES, progress=False)
    big = train_wordpiece_tokenizer(SENTENCES * 3 + ["zebra yak"], vocab_size=200)
    small = tiny_bert(tokenizer, max_position_embeddings=64)
    small.config.vocab_size = 10
    with pytest.raises(ValueError, match="does not belong to this model"):
        mlm_curve(small, big, ["the zebra"], progress=False)


def test_wordpiece_training_gives_the_same_vocabulary_every_time():
    # tokenizers' trainer numbers its "##" pieces in hash-map order, a new order for every map
    # (so within one process too); before the fix, 8 trainings on SENTENCES gave 8 different
    # id assignments and 5 different vocabularies.
    trained = [train_wordpiece_tokenizer(SENTENCES, vocab_size=120) for _ in range(8)]
    assert len({tuple(sorted(tok.get_vocab().items())) for tok in trained}) == 1
    tok = trained[0]
    # The "##c" declared to fix the numbering are ordinary pieces, not special tokens.
    assert sorted(tok.all_special_tokens) == ["[CLS]", "[MASK]", "[PAD]", "[SEP]", "[UNK]"]
    assert "##e" in tok.get_vocab() and "##e" not in tok.tokenize("e##e")
    ids = tok(SENTENCES)["input_ids"]
    assert tok.batch_decode(ids, skip_special_tokens=True) == SENTENCES


def test_tokenizer_builders_name_their_bad_arguments():
    for build in (train_wordpiece_tokenizer, word_level_tokenizer):
        with pytest.raises(TypeError, match="not one string"):
            build("the cat sat")  # would otherwise train on single characters
        with pytest.raises(TypeError, match="texts must hold strings"):
            build(["the cat", 2])
    with pytest.raises(ValueError, match="vocab_size"):
        train_wordpiece_tokenizer(SENTENCES, vocab_size=0)


def test_curve_helpers_make_their_tensors_on_the_input_device():
    # A tensor made without device= lands on the default device. Make that "meta": one made
    # there regardless of the input's device (CPU here; CUDA for a GPU user) shows up.
    curve = MLMCurve(
        rates=torch.tensor([0.1, 0.3, 0.5]), sizes=torch.tensor([[1], [1], [2]]),
        mean=torch.tensor([[-1.0], [-1.0], [-3.0]]), stderr=torch.zeros(3, 1),
        num_tokens=torch.tensor([4]),
    )  # fmt: skip
    with torch.device("meta"):
        per_text = curve.per_text(0)
    assert per_text.sizes.device.type == per_text.mean.device.type == "cpu"
    assert per_text.sizes.tolist() == [1, 2]
    assert per_text.mean.tolist() == [-1.0, -3.0]


def test_a_non_generator_is_named(model, tokenizer):
    for score in (mlm_curve, mlm_score):
        with pytest.raises(TypeError, match="generator must be a torch.Generator"):
            score(model, tokenizer, SENTENCES, generator=0, progress=False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_model_on_cuda_scores_as_on_cpu(tokenizer):
    model = tiny_bert(tokenizer, initializer_range=0.2)

    def scores(model):
        curve = mlm_curve(model, tokenizer, SENTENCES, rates=[0.2, 0.9], masks_per_rate=3,
                          generator=torch.Generator().manual_seed(0), progress=False)
        score = mlm_score(model, tokenizer, SENTENCES, num_masks=3,
                          generator=torch.Generator().manual_seed(0), progress=False)
        return curve, score  # fmt: skip

    cpu_curve, cpu_score = scores(model)
    cuda_curve, cuda_score = scores(model.cuda())
    torch.testing.assert_close(cuda_curve.mean, cpu_curve.mean, atol=1e-4, rtol=0)
    torch.testing.assert_close(cuda_curve.per_text(0).mean, cpu_curve.per_text(0).mean,
                               atol=1e-4, rtol=0)  # fmt: skip
    torch.testing.assert_close(cuda_score.pseudo_log_likelihood, cpu_score.pseudo_log_likelihood,
                               atol=1e-3, rtol=0)  # fmt: skip
    torch.testing.assert_close(cuda_score.log_prob.mean, cpu_score.log_prob.mean, atol=1e-3,
                               rtol=0)  # fmt: skip


def test_module_imports_without_transformers_and_names_the_extra():
    # A fresh interpreter in which transformers and tokenizers cannot be imported.
    code = (
        "import sys\n"
        "sys.modules['transformers'] = None\n"
        "sys.modules['tokenizers'] = None\n"
        "import pyro_mpt.mlm as mlm\n"
        "for call in (lambda: mlm.mlm_curve(None, None, ['a']),\n"
        "             lambda: mlm.train_wordpiece_tokenizer(['a'])):\n"
        "    try:\n"
        "        call()\n"
        "    except ImportError as exc:\n"
        "        assert 'pyro_mpt[mlm]' in str(exc), exc\n"
        "    else:\n"
        "        raise AssertionError('no ImportError')\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_experiment_smoke(tmp_path):
    from pyro_mpt.experiments.mlm import run

    results = run(tmp_path, steps=3, eval_texts=3, masks_per_rate=2, progress=False)
    for name in ("mlm_curve.png", "results.json", "results.md"):
        assert (tmp_path / name).stat().st_size > 0
    assert len(results["trained"]["curve_mean"]) == len(results["rates"])
    assert results["eval_texts"] == 3
    assert results["checks"]["untrained_max_deviation"] < 0.2
    markdown = (tmp_path / "results.md").read_text()
    assert markdown.rstrip().splitlines()[-1].startswith("Wall time ")
    assert "CPU time" in markdown and "load average" in markdown
