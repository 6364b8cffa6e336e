r"""Language-model scoring at corpus scale: masked LMs, masked diffusion LMs, any masked predictor.

For a text of D scored tokens and a predictor of the hidden tokens of a partly masked text,

.. math::

    S(x; m) = \binom{D}{m}^{-1} \sum_{|M| = m} \frac{1}{m} \sum_{j \in M} \log p(x_j \mid x_R),
    \qquad \sum_{m=1}^{D} S(x; m)

is the cumulative masked pre-training score (Moreno-Muñoz et al., 2023): :math:`\log p(x)` when
the conditionals come from one joint, and in general the expected log-likelihood over the orders
of the chain rule. For a masked diffusion LM with a time-independent denoiser and the linear
schedule it is exactly minus the continuous-time NELBO (MDLM, MD4, LLaDA), since
:math:`\int_0^1 \frac{1}{t} \binom{D}{k} t^k (1-t)^{D-k}\,dt = 1/k`. This package estimates it
without bias, stratified over masking rates, with a standard error per text, and returns the
per-rate curve and the pseudo-log-likelihood alongside:

* :class:`MaskedPredictor`: a ``*ForMaskedLM``, or any callable ``input_ids -> logits`` with an
  explicit mask id (a diffusion LM, an ``nn.Module``; tokenizers without a mask token such as
  GPT-2's), and its tokenizer.
* :func:`score_texts`: texts or ``(prompt, continuation)`` pairs to per-text
  :class:`TextScore`; a fixed number of masks or ``target_stderr``.
* :class:`StratifiedBins`, :class:`DiffusionTime`: mask schemes (the default, and masked
  diffusion's t-sampling for comparison).
* :func:`score_file`: a text or JSONL file to a JSONL file, resumable, sharded across the
  processes of ``accelerate launch`` (the ``pyro-mpt score`` command).

Needs the optional extra ``pip install 'pyro_mpt[lm]'`` (transformers, tokenizers, accelerate).
Nothing is downloaded: models are read from local directories.

Example:
    >>> import torch
    >>> from pyro_mpt.lm import MaskedPredictor, score_texts
    >>> from pyro_mpt.mlm import word_level_tokenizer
    >>> tokenizer = word_level_tokenizer(["the cat sat on the mat"])
    >>> uniform = lambda input_ids: torch.zeros(*input_ids.shape, len(tokenizer))
    >>> predictor = MaskedPredictor(uniform, tokenizer, mask_token_id=tokenizer.mask_token_id)
    >>> [score] = score_texts(predictor, ["the cat sat"])
    >>> score.num_tokens, round(score.pseudo_log_likelihood, 3)  # 3 tokens, each -ln 10
    (3, -6.908)
"""

from .corpus import read_texts, score_file
from .predictor import EncodedText, MaskedPredictor
from .schemes import DiffusionTime, StratifiedBins
from .score import TextCurve, TextScore, score_texts, text_generator

__all__ = [
    "DiffusionTime",
    "EncodedText",
    "MaskedPredictor",
    "StratifiedBins",
    "TextCurve",
    "TextScore",
    "read_texts",
    "score_file",
    "score_texts",
    "text_generator",
]
