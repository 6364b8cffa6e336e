r"""Masked language models: the whole masked-prediction curve and its area, not just the PLL.

For a text of D scoreable tokens :math:`x = (x_1, \dots, x_D)` (special tokens are context, never
scored: see below) a masked language model gives per-token conditionals
:math:`p(x_j \mid x_R)`: the probability of the hidden token j given the visible ones. Write

.. math::

    S(x; m) = \binom{D}{m}^{-1} \sum_{|M| = m} \frac{1}{m} \sum_{j \in M} \log p(x_j \mid x_R),
    \qquad R = \{1..D\} \setminus M,

the mean per-token log-probability of the masked tokens when m of them are hidden. Averaging the
chain rule over all orderings gives

.. math::

    \log p(x) = \sum_{m=1}^{D} S(x; m)

(Moreno-Muñoz et al., 2023; Fong & Holmes, 2020). The m = 1 term times D is the
pseudo-log-likelihood :math:`\mathrm{PLL}(x) = \sum_j \log p(x_j \mid x_{-j})` that masked LMs are
usually scored with (Salazar et al., 2020, *mlm-scoring*; Misra, *minicons*); the other terms say
how well the model predicts with less and less context, and the area estimates :math:`\log p(x)`.
A trained model's curve falls as the masking rate rises; an untrained one is flat near
:math:`-\log V` (V the vocabulary size).

A masked LM's conditionals are not, in general, derived from one joint distribution, so the area
is the marginal likelihood of the joint the model would define *if* they were consistent: an
honest score of the model's masked predictions at every context size, comparable across models
with the same tokenizer.

* :func:`mlm_curve` estimates :math:`S(x; m)` per text at chosen masking rates
  (``m = round(rate * D)``, at least 1), with Monte-Carlo standard errors. When a size has no more
  than ``masks_per_rate`` distinct masks (m = 1 on short texts, m = D always), all of them are
  used and the term is exact.
* :func:`mlm_score` estimates :math:`\log p(x)` per text with a :mod:`~pyro_mpt.masks` scheme
  (unbiased :class:`~pyro_mpt.masks.Cumulative` by default) and returns the exact PLL alongside.

A token is special when its id is one of ``tokenizer.all_special_ids``, wherever it came from: the
``[CLS]`` and ``[SEP]`` the tokenizer adds, a special-token string typed in the text (the
characters ``"[MASK]"`` become the mask id, which a model cannot be asked to predict), and the
``[UNK]`` that stands for an unknown word. This is the rule Hugging Face's
``DataCollatorForLanguageModeling`` uses to choose the tokens a masked LM is trained to predict.
Special tokens stay in the input as context and are not counted in D (``num_tokens``).

Needs the optional extra ``pip install 'pyro_mpt[mlm]'`` (``transformers``, ``tokenizers``);
this module imports without it and says so when used. Nothing is downloaded: load your model with
``AutoModelForMaskedLM.from_pretrained(local_path)``.

References:
    P. Moreno-Muñoz, P. G. Recasens, S. Hauberg, "On Masked Pre-training and the Marginal
    Likelihood", NeurIPS 2023.
    E. Fong, C. Holmes, "On the marginal likelihood and cross-validation", Biometrika 107(2), 2020.
    J. Salazar, D. Liang, T. Q. Nguyen, K. Kirchhoff, "Masked Language Model Scoring", ACL 2020.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Iterator, Sequence
from typing import NamedTuple

import torch
from tqdm.auto import tqdm

from .lm.predictor import MaskedPredictor, require_transformers
from .masks import (
    Cumulative,
    MaskSample,
    MaskScheme,
    _check_generator,
    _check_positive_int,
    masks_of_sizes,
    size_for_rate,
)
from .scoring import MPTCurve, MPTEstimate

__all__ = [
    "DEFAULT_RATES",
    "MLMCurve",
    "MLMScore",
    "mlm_curve",
    "mlm_score",
    "train_wordpiece_tokenizer",
    "word_level_tokenizer",
]

#: The paper's E4 grid of masking rates, 1% to 99%.
DEFAULT_RATES = (0.01, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99)

class MLMCurve(NamedTuple):
    r"""Masked-prediction scores :math:`S(x; m)` of a masked LM per masking rate and text.

    Texts have different numbers of tokens D, so one rate means a different mask size per text.

    Attributes:
        rates: ``(R,)`` masking rates, ascending.
        sizes: ``(R, N)`` long, the mask size m used for each rate and text.
        mean: ``(R, N)`` estimates of :math:`S(x_n; m)`, nats per masked token.
        stderr: ``(R, N)`` their Monte-Carlo standard errors (0 where all masks were enumerated).
        num_tokens: ``(N,)`` long, D of each text: its tokens that are not special (``[UNK]``
            is special).
    """

    rates: torch.Tensor
    sizes: torch.Tensor
    mean: torch.Tensor
    stderr: torch.Tensor
    num_tokens: torch.Tensor

    def per_text(self, index: int) -> MPTCurve:
        """The curve of one text as a :class:`~pyro_mpt.scoring.MPTCurve` (distinct sizes only).

        Example:
            >>> curve = MLMCurve(rates=torch.tensor([0.1, 0.5]), sizes=torch.tensor([[1], [1]]),
            ...                  mean=torch.tensor([[-2.0], [-2.0]]), stderr=torch.zeros(2, 1),
            ...                  num_tokens=torch.tensor([2]))
            >>> curve.per_text(0).sizes.tolist()
            [1]
        """
        sizes, first = _first_occurrences(self.sizes[:, index])
        return MPTCurve(
            sizes,
            sizes.to(self.mean.dtype) / int(self.num_tokens[index]),
            self.mean[first, index],
            self.stderr[first, index],
            int(self.num_tokens[index]),
        )

    def area(self) -> MPTEstimate:
        r"""Per-text area :math:`\sum_{m=1}^{D} S(x; m)`, an estimate of :math:`\log p(x)`.

        Sizes between the measured ones are linearly interpolated and held constant beyond the
        ends (see :meth:`pyro_mpt.scoring.MPTCurve.area`); for an unbiased estimate use
        :func:`mlm_score`.

        Example:
            >>> curve = MLMCurve(rates=torch.tensor([0.5, 1.0]), sizes=torch.tensor([[1], [2]]),
            ...                  mean=torch.tensor([[-1.0], [-3.0]]), stderr=torch.zeros(2, 1),
            ...                  num_tokens=torch.tensor([2]))
            >>> curve.area().mean.tolist()
            [-4.0]
        """
        estimates = [self.per_text(n).area() for n in range(len(self.num_tokens))]
        return MPTEstimate(
            torch.stack([e.mean for e in estimates]), torch.stack([e.stderr for e in estimates])
        )

    def average(self) -> MPTEstimate:
        r"""Mean of :math:`S(x; m)` over texts at each rate, ``(R,)``, the curve one plots.

        The standard error is the Monte-Carlo error of that mean for these texts (independent
        masks per text), not a sampling error over texts.

        Example:
            >>> curve = MLMCurve(rates=torch.tensor([0.5]), sizes=torch.tensor([[1, 2]]),
            ...                  mean=torch.tensor([[-1.0, -3.0]]), stderr=torch.ones(1, 2),
            ...                  num_tokens=torch.tensor([2, 4]))
            >>> curve.average().mean.tolist()
            [-2.0]
        """
        count = self.mean.shape[-1]
        return MPTEstimate(self.mean.mean(-1), self.stderr.pow(2).sum(-1).sqrt() / count)


class MLMScore(NamedTuple):
    r"""Per-text scores of a masked LM, in nats.

    Attributes:
        log_prob: :class:`~pyro_mpt.scoring.MPTEstimate` of :math:`\log p(x)` (the cumulative
            masked pre-training score) with its standard error, ``(N,)``.
        pseudo_log_likelihood: ``(N,)`` exact :math:`\sum_j \log p(x_j \mid x_{-j})`, the m = 1
            term times D (what mlm-scoring and minicons report).
        num_tokens: ``(N,)`` long, D of each text.
    """

    log_prob: MPTEstimate
    pseudo_log_likelihood: torch.Tensor
    num_tokens: torch.Tensor


def _first_occurrences(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Distinct values of a sorted 1-d tensor and the index of each one's first occurrence
    (both on ``values``' device)."""
    distinct, inverse = torch.unique_consecutive(values, return_inverse=True)
    first = torch.full((len(distinct),), len(values), dtype=torch.long, device=values.device)
    positions = torch.arange(len(values), device=values.device)
    return distinct, first.scatter_reduce(0, inverse, positions, reduce="amin")


def _masks_of_size(
    size: int, event_size: int, masks_per_rate: int, generator: torch.Generator | None
) -> tuple[torch.Tensor, bool]:
    """``masks_per_rate`` random masks of ``size`` tokens, or all of them when there are no more
    than that (returned with ``exact=True``)."""
    if math.comb(event_size, size) <= masks_per_rate:
        masks = torch.zeros(math.comb(event_size, size), event_size, dtype=torch.bool)
        for row, subset in enumerate(itertools.combinations(range(event_size), size)):
            masks[row, list(subset)] = True
        return masks, True
    sizes = torch.full((masks_per_rate,), size)
    return masks_of_sizes(sizes, event_size, generator), False


def _check_rates(rates: Sequence[float]) -> list[float]:
    try:
        rates = [float(rate) for rate in rates]
    except (TypeError, ValueError) as exc:
        raise ValueError(f"rates must be a sequence of numbers in (0, 1], got {rates!r}") from exc
    if not rates:
        raise ValueError("rates must contain at least one masking rate in (0, 1]")
    for rate in rates:
        if not (math.isfinite(rate) and 0.0 < rate <= 1.0):
            raise ValueError(f"rates must lie in (0, 1] (a fraction of the tokens), got {rate!r}")
    return sorted(set(rates))


def mlm_curve(
    model,
    tokenizer,
    texts: Sequence[str],
    rates: Sequence[float] = DEFAULT_RATES,
    masks_per_rate: int = 8,
    batch_size: int = 32,
    generator: torch.Generator | None = None,
    progress: bool = True,
    *,
    mask_token_id: int | None = None,
) -> MLMCurve:
    r"""Mean per-token masked log-probability :math:`S(x; m)` of each text at each masking rate.

    For text n with :math:`D_n` scoreable tokens and rate :math:`\rho`, the mask size is
    :math:`m = \mathrm{round}(\rho D_n)` (at least 1); ``masks_per_rate`` uniformly random masks
    of that size are scored, or every mask when there are no more than that many (then the term is
    exact: at m = 1 with ``masks_per_rate >= D`` it is the pseudo-log-likelihood divided by D).

    Args:
        model: a Hugging Face masked LM (``AutoModelForMaskedLM``), on any device; or, with
            ``mask_token_id``, any predictor ``input_ids -> logits`` (see
            :class:`~pyro_mpt.lm.MaskedPredictor`).
        tokenizer: its tokenizer (must define a mask token unless ``mask_token_id`` is given).
        texts: list of strings; special tokens (those the tokenizer adds, special-token strings
            typed in the text, ``[UNK]``, the mask id) are context, never masked or scored.
        rates: masking rates in (0, 1] (sorted, duplicates merged); default :data:`DEFAULT_RATES`.
        masks_per_rate: masks per rate and text (>= 2 for a standard error).
        batch_size: the most rows per forward pass (a batch holds one text's masks only).
        generator: a CPU ``torch.Generator`` for reproducible masks (masks are drawn on the CPU
            and only the batches go to the model's device).
        progress: show a tqdm progress bar.
        mask_token_id: the predictor's mask id, for a ``model`` that is not a masked LM.

    Returns:
        :class:`MLMCurve`; ``.average()`` is the corpus curve, ``.area()`` the per-text areas.

    Example:
        >>> from transformers import AutoModelForMaskedLM, AutoTokenizer  # doctest: +SKIP
        >>> model = AutoModelForMaskedLM.from_pretrained("/path/to/bert")  # doctest: +SKIP
        >>> tokenizer = AutoTokenizer.from_pretrained("/path/to/bert")  # doctest: +SKIP
        >>> curve = mlm_curve(model, tokenizer, ["The cat sat on the mat."])  # doctest: +SKIP
        >>> curve.average().mean  # S(x; m) per rate, nats per token  # doctest: +SKIP
    """
    predictor = MaskedPredictor(model, tokenizer, mask_token_id)
    rates = _check_rates(rates)
    _check_positive_int("masks_per_rate", masks_per_rate)
    _check_positive_int("batch_size", batch_size)
    _check_generator(generator)
    encoded = predictor.encode_all(texts)
    sizes = torch.tensor(
        [[size_for_rate(rate, len(text.positions)) for text in encoded] for rate in rates]
    )
    mean = torch.empty(sizes.shape, dtype=torch.float64)
    stderr = torch.empty(sizes.shape, dtype=torch.float64)
    for n, text in enumerate(tqdm(encoded, desc="MLM curve", disable=not progress, leave=False)):
        # One set of masks per distinct size; rates that round to the same size share it.
        groups = []
        for m in sorted(set(sizes[:, n].tolist())):
            masks, exact = _masks_of_size(m, len(text.positions), masks_per_rate, generator)
            weights = torch.full((len(masks),), 1.0 / (m * len(masks)), dtype=torch.float64)
            groups.append((m, MaskSample(masks, weights, torch.zeros(len(masks), dtype=torch.long),
                                         exact)))  # fmt: skip
        sums = predictor.masked_sums(text, torch.cat([g.masks for _, g in groups]), batch_size)
        for (m, group), group_sums in zip(groups, sums.split([len(g.masks) for _, g in groups]),
                                          strict=True):  # fmt: skip
            estimate = group.estimate(group_sums, summed=True)  # the mean of S(x; m) over masks
            where = sizes[:, n] == m
            mean[where, n] = estimate.mean
            stderr[where, n] = estimate.stderr
    num_tokens = torch.tensor([len(text.positions) for text in encoded])
    return MLMCurve(torch.tensor(rates, dtype=torch.float64), sizes, mean, stderr, num_tokens)


def mlm_score(
    model,
    tokenizer,
    texts: Sequence[str],
    masks: MaskScheme | None = None,
    num_masks: int = 64,
    batch_size: int = 32,
    generator: torch.Generator | None = None,
    progress: bool = True,
    *,
    mask_token_id: int | None = None,
) -> MLMScore:
    r"""Cumulative masked pre-training estimate of :math:`\log p(x)` per text, and its PLL.

    Each text draws ``num_masks`` replicates of the scheme ``masks`` over its D scoreable tokens
    (default :class:`~pyro_mpt.masks.Cumulative`: :math:`m \sim U\{1..D\}`, weight D/m,
    unbiased); :class:`~pyro_mpt.masks.Stratified` has lower variance at ``D * masks_per_size``
    forward passes per replicate, :class:`~pyro_mpt.masks.Exhaustive` is exact for short texts.
    The pseudo-log-likelihood costs D more forward passes per text and is exact.

    Args:
        model: a Hugging Face masked LM (``AutoModelForMaskedLM``), on any device; or, with
            ``mask_token_id``, any predictor ``input_ids -> logits`` (see
            :class:`~pyro_mpt.lm.MaskedPredictor`).
        tokenizer: its tokenizer (must define a mask token unless ``mask_token_id`` is given).
        texts: list of strings; special tokens (those the tokenizer adds, special-token strings
            typed in the text, ``[UNK]``, the mask id) are context, never masked or scored.
        masks: a :class:`~pyro_mpt.masks.MaskScheme`; default :class:`~pyro_mpt.masks.Cumulative`.
        num_masks: replicates of the scheme's draw per text (>= 2 for a standard error).
        batch_size: the most rows per forward pass (a batch holds one text's masks only).
        generator: a CPU ``torch.Generator`` for reproducible masks (masks are drawn on the CPU
            and only the batches go to the model's device).
        progress: show a tqdm progress bar.
        mask_token_id: the predictor's mask id, for a ``model`` that is not a masked LM.

    Returns:
        :class:`MLMScore` with ``log_prob`` (estimate, standard error), the exact
        ``pseudo_log_likelihood`` and ``num_tokens``, all ``(N,)``, in nats per text.

    Example:
        >>> from transformers import AutoModelForMaskedLM, AutoTokenizer  # doctest: +SKIP
        >>> model = AutoModelForMaskedLM.from_pretrained("/path/to/bert")  # doctest: +SKIP
        >>> tokenizer = AutoTokenizer.from_pretrained("/path/to/bert")  # doctest: +SKIP
        >>> score = mlm_score(model, tokenizer, ["The cat sat on the mat."])  # doctest: +SKIP
        >>> score.log_prob.mean, score.pseudo_log_likelihood  # doctest: +SKIP
    """
    predictor = MaskedPredictor(model, tokenizer, mask_token_id)
    masks = Cumulative() if masks is None else masks
    if not isinstance(masks, MaskScheme):
        raise TypeError(f"masks must be a pyro_mpt.masks.MaskScheme, got {type(masks).__name__}")
    _check_positive_int("num_masks", num_masks)
    _check_positive_int("batch_size", batch_size)
    _check_generator(generator)
    encoded = predictor.encode_all(texts)
    # All texts' masks first, in order, so that a generator gives the masks it always gave.
    draws = [
        masks.sample(len(text.positions), (), num_masks, generator, dtype=torch.float64)
        for text in encoded
    ]
    estimates, plls = [], []
    for text, draw in tqdm(list(zip(encoded, draws, strict=True)), desc="MLM score",
                           disable=not progress, leave=False):  # fmt: skip
        singles = torch.eye(len(text.positions), dtype=torch.bool)
        sums = predictor.masked_sums(text, torch.cat([draw.masks, singles]), batch_size)
        estimates.append(draw.estimate(sums[: len(draw.masks)], summed=True))
        plls.append(sums[len(draw.masks) :].sum())
    return MLMScore(
        MPTEstimate(
            torch.stack([e.mean for e in estimates]), torch.stack([e.stderr for e in estimates])
        ),
        torch.stack(plls),
        torch.tensor([len(text.positions) for text in encoded]),
    )


def train_wordpiece_tokenizer(
    texts: Iterable[str], vocab_size: int = 2000, lowercase: bool = True, max_length: int = 512
):
    """Train a BERT-style WordPiece tokenizer locally and wrap it for ``transformers``.

    Adds ``[PAD] [UNK] [CLS] [SEP] [MASK]`` (ids 0-4) and the ``[CLS] text [SEP]`` template, so
    that it works with :func:`mlm_curve` and a ``BertForMaskedLM`` built from a config. Nothing is
    downloaded. The same texts give the same vocabulary and ids at every call and in every
    process.

    Args:
        texts: training text.
        vocab_size: target vocabulary size (special tokens included; may come out smaller for a
            small corpus).
        lowercase: lowercase and strip accents, as ``bert-base-uncased`` does.
        max_length: the tokenizer's ``model_max_length``.

    Returns:
        A ``transformers.PreTrainedTokenizerFast``.

    Example:
        >>> tok = train_wordpiece_tokenizer(["the cat sat on the mat"], vocab_size=40)
        >>> tok.convert_ids_to_tokens(tok("the cat")["input_ids"])
        ['[CLS]', 'the', 'cat', '[SEP]']
    """
    require_transformers()
    from tokenizers import Tokenizer, models
    from tokenizers.trainers import WordPieceTrainer

    _check_positive_int("vocab_size", vocab_size)
    texts = _text_list(texts)
    # The trainer creates a continuing piece "##c" for every character c that follows another in
    # a word, numbering them in hash-map order, and breaks ties between merges by those numbers:
    # the same texts gave a different vocabulary from one call to the next
    # (huggingface/tokenizers#1794). Declaring the same pieces up front fixes their numbers; the
    # tokenizer is then rebuilt from the vocabulary, so that they are not special tokens.
    continuing = sorted({c for word in _bert_words(texts, lowercase) for c in word[1:]})
    trainer = WordPieceTrainer(
        vocab_size=vocab_size,
        special_tokens=[*_SPECIAL_TOKENS.values(), *(f"##{c}" for c in continuing)],
        show_progress=False,
    )
    trained = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    trained.normalizer, trained.pre_tokenizer = _bert_splitting(lowercase)
    trained.train_from_iterator(texts, trainer)
    return _bert_tokenizer(trained.get_vocab(), lowercase, max_length)


def word_level_tokenizer(texts: Iterable[str], lowercase: bool = True, max_length: int = 512):
    """A BERT-style tokenizer whose vocabulary is every word and punctuation mark of ``texts``.

    The same ``[PAD] [UNK] [CLS] [SEP] [MASK]`` (ids 0-4), normalisation and ``[CLS] text [SEP]``
    template as :func:`train_wordpiece_tokenizer`, but no subwords: the words, sorted, are the
    vocabulary, so the same texts always give the same ids. A word not in ``texts`` becomes
    ``[UNK]``.

    Example:
        >>> tok = word_level_tokenizer(["The cat sat.", "a dog"])
        >>> tok.convert_ids_to_tokens(tok("the cat, a zebra")["input_ids"])
        ['[CLS]', 'the', 'cat', '[UNK]', 'a', '[UNK]', '[SEP]']
        >>> tok.convert_ids_to_tokens(list(range(5, len(tok))))
        ['.', 'a', 'cat', 'dog', 'sat', 'the']
    """
    require_transformers()
    words = set(_bert_words(_text_list(texts), lowercase)) - set(_SPECIAL_TOKENS.values())
    tokens = [*_SPECIAL_TOKENS.values(), *sorted(words)]
    return _bert_tokenizer({token: i for i, token in enumerate(tokens)}, lowercase, max_length)


_SPECIAL_TOKENS = {"pad_token": "[PAD]", "unk_token": "[UNK]", "cls_token": "[CLS]",
                   "sep_token": "[SEP]", "mask_token": "[MASK]"}  # fmt: skip


def _text_list(texts: Iterable[str]) -> list[str]:
    """``texts`` as a list of strings; a lone string (an iterable of characters) is refused."""
    if isinstance(texts, str):
        raise TypeError("texts must be an iterable of strings, not one string: pass [texts]")
    texts = list(texts)
    for text in texts:
        if not isinstance(text, str):
            raise TypeError(f"texts must hold strings, got an item of type {type(text).__name__}")
    return texts


def _bert_splitting(lowercase: bool):
    """BERT's normaliser and pre-tokeniser (``bert-base-uncased``'s with ``lowercase``)."""
    from tokenizers import normalizers, pre_tokenizers

    normalizer = normalizers.BertNormalizer(lowercase=lowercase, strip_accents=lowercase)
    return normalizer, pre_tokenizers.BertPreTokenizer()


def _bert_words(texts: list[str], lowercase: bool) -> Iterator[str]:
    """The words and punctuation marks of ``texts``, normalised and split as BERT does."""
    normalizer, splitter = _bert_splitting(lowercase)
    for text in texts:
        for word, _ in splitter.pre_tokenize_str(normalizer.normalize_str(text)):
            yield word


def _bert_tokenizer(vocabulary: dict[str, int], lowercase: bool, max_length: int):
    """A ``transformers`` tokenizer: WordPiece over ``vocabulary`` (which holds the five special
    tokens), BERT's splitting and the ``[CLS] text [SEP]`` template."""
    from tokenizers import Tokenizer, decoders, models, processors
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordPiece(vocabulary, unk_token="[UNK]"))
    tokenizer.normalizer, tokenizer.pre_tokenizer = _bert_splitting(lowercase)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocabulary["[CLS]"]), ("[SEP]", vocabulary["[SEP]"])],
    )
    tokenizer.decoder = decoders.WordPiece()
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, model_max_length=max_length, **_SPECIAL_TOKENS
    )
