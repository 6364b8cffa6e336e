r"""Any masked predictor (``*ForMaskedLM``, masked diffusion LM, plain module) and its tokenizer.

A *masked predictor* maps token ids, some of them replaced by a mask id, to logits over the
vocabulary at every position. :class:`MaskedPredictor` wraps one together with its tokenizer and
knows which tokens are scored, how a text (or a prompt and its continuation) becomes ids, and how
to run the forward passes that give :math:`\sum_{j \in M} \log p(x_j \mid x_R)` for a batch of
masks.

Forward passes never mix texts: every row of a batch is the same text with a different mask, so
rows have the same length, nothing is padded, and a predictor that takes no attention mask (a
diffusion LM called as ``model(input_ids)``) needs none. It also makes each text's numbers
independent of what else is scored alongside it, in this process or another.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import NamedTuple

import torch

from ..masks import _check_positive_int

__all__ = ["EncodedText", "MaskedPredictor"]

_EXTRA_HINT = (
    "install the optional extra: pip install 'pyro_mpt[mlm]' ('pyro_mpt[lm]' adds accelerate, "
    "for several processes)"
)


def require_transformers():
    """Import ``transformers`` or fail with an ImportError that names the extra."""
    try:
        import transformers
    except ImportError as exc:
        raise ImportError(
            f"pyro_mpt.mlm and pyro_mpt.lm need Hugging Face transformers and tokenizers; "
            f"{_EXTRA_HINT}"
        ) from exc
    return transformers


def check_masked_lm(model) -> None:
    """Refuse anything that is not a Hugging Face masked language model."""
    transformers = require_transformers()
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    name = type(model).__name__
    is_mlm = name in set(MODEL_FOR_MASKED_LM_MAPPING_NAMES.values()) or name.endswith("ForMaskedLM")
    if not isinstance(model, transformers.PreTrainedModel) or not is_mlm:
        raise TypeError(
            "model must be a Hugging Face masked language model (what AutoModelForMaskedLM "
            f"loads, e.g. BertForMaskedLM), got {name}; for any other predictor "
            "(input_ids -> logits) pass mask_token_id"
        )


class EncodedText(NamedTuple):
    """One tokenized text.

    Attributes:
        input_ids: ``(T,)`` long, every token the predictor sees (special tokens and prompt
            included).
        positions: ``(D,)`` long, the positions that are masked and scored.
        prompt_tokens: tokens of the prompt (always visible); 0 for an unconditional text.
    """

    input_ids: torch.Tensor
    positions: torch.Tensor
    prompt_tokens: int = 0


def _device_of(model) -> torch.device:
    if isinstance(model, torch.nn.Module):
        for parameter in model.parameters():
            return parameter.device
    return torch.device("cpu")


def _takes_attention_mask(model) -> bool:
    function = model.forward if isinstance(model, torch.nn.Module) else model
    try:
        parameters = inspect.signature(function).parameters
    except (TypeError, ValueError):  # a builtin without a signature
        return False
    return "attention_mask" in parameters


def _max_length(model, tokenizer, explicit: int | None) -> int | None:
    """The longest input the model accepts: the tokenizer's and the config's limits."""
    limits = [
        explicit,
        getattr(tokenizer, "model_max_length", None),
        getattr(getattr(model, "config", None), "max_position_embeddings", None),
    ]
    limits = [int(limit) for limit in limits if isinstance(limit, int) and 0 < limit < 10**9]
    return min(limits) if limits else None


class MaskedPredictor:
    r"""A masked predictor and its tokenizer: what :func:`~pyro_mpt.lm.score_texts` scores.

    Args:
        model: either a Hugging Face masked LM (what ``AutoModelForMaskedLM`` loads; then
            ``mask_token_id`` defaults to the tokenizer's), or any callable
            ``input_ids[, attention_mask] -> logits`` of shape ``(B, T, V)`` (a tensor, or an
            output with ``.logits``) together with an explicit ``mask_token_id``: a masked
            diffusion LM loaded with ``trust_remote_code``, an ``nn.Module``, a function.
            ``attention_mask`` (all ones: rows are never padded) is passed when the callable's
            signature names it. An ``nn.Module`` is put in eval mode while it scores.
        tokenizer: a Hugging Face tokenizer. It needs no mask token when ``mask_token_id`` is
            given (GPT-2's, with the mask id appended to the model's vocabulary).
        mask_token_id: the id the predictor reads as "hidden".
        max_length: the longest input the predictor accepts (default: the smaller of the
            tokenizer's ``model_max_length`` and the config's ``max_position_embeddings``).
        device: where the ids go (default: the device of the module's first parameter, else the
            CPU).
        shift_logits: the predictor's logits at position i predict token i + 1, as in diffusion
            LMs adapted from autoregressive ones (Dream); they are shifted back by one.

    A token is scored unless its id is special: one of ``tokenizer.all_special_ids`` or the mask
    id, whether the tokenizer added it or it was typed in the text (``[MASK]``, ``[SEP]``,
    ``<|endoftext|>``); ``[UNK]`` is special too. This is the rule of Hugging Face's
    ``DataCollatorForLanguageModeling``.

    Example:
        >>> import torch
        >>> from pyro_mpt.mlm import word_level_tokenizer
        >>> tokenizer = word_level_tokenizer(["the cat sat on the mat"])
        >>> uniform = lambda input_ids: torch.zeros(*input_ids.shape, len(tokenizer))
        >>> predictor = MaskedPredictor(uniform, tokenizer, mask_token_id=tokenizer.mask_token_id)
        >>> text = predictor.encode("the cat")
        >>> text.positions.tolist()  # [CLS] the cat [SEP]
        [1, 2]
        >>> # uniform over 10 tokens: log p = -ln 10 = -2.3026 per hidden token
        >>> predictor.masked_sums(text, torch.tensor([[True, False], [True, True]]))
        tensor([-2.3026, -4.6052], dtype=torch.float64)
    """

    def __init__(
        self,
        model: Callable,
        tokenizer,
        mask_token_id: int | None = None,
        *,
        max_length: int | None = None,
        device: torch.device | str | None = None,
        shift_logits: bool = False,
    ):
        if mask_token_id is None:
            check_masked_lm(model)
            mask_token_id = getattr(tokenizer, "mask_token_id", None)
            if mask_token_id is None:
                raise ValueError(
                    f"tokenizer must define a mask token (tokenizer.mask_token_id), got "
                    f"{tokenizer!r}; or pass mask_token_id"
                )
        elif isinstance(mask_token_id, bool) or not isinstance(mask_token_id, int) or (
            mask_token_id < 0
        ):
            raise ValueError(f"mask_token_id must be a non-negative integer, got {mask_token_id!r}")
        if not callable(model):
            raise TypeError(f"model must be callable (input_ids -> logits), got {model!r}")
        if max_length is not None:
            _check_positive_int("max_length", max_length)
        self.model = model
        self.tokenizer = tokenizer
        self.mask_token_id = int(mask_token_id)
        self.max_length = _max_length(model, tokenizer, max_length)
        self.device = torch.device(device) if device is not None else _device_of(model)
        self.shift_logits = bool(shift_logits)
        config = getattr(model, "config", None)
        vocab_size = getattr(config, "vocab_size", None)
        self.vocab_size = vocab_size if isinstance(vocab_size, int) else None
        special = set(getattr(tokenizer, "all_special_ids", [])) | {self.mask_token_id}
        self.special_ids = torch.tensor(sorted(special), dtype=torch.long)
        self._is_hf = _is_pretrained_model(model)
        self._attention = _takes_attention_mask(model)

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        mask_token_id: int | None = None,
        *,
        trust_remote_code: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        shift_logits: bool = False,
    ) -> MaskedPredictor:
        """Load a model and its tokenizer from a local checkpoint directory (nothing is
        downloaded).

        ``AutoModelForMaskedLM`` is tried first. An architecture it does not know is loaded with
        ``AutoModel`` when ``mask_token_id`` is given or ``trust_remote_code`` is set (a masked
        diffusion LM whose own code ships in the directory: LLaDA, Dream); the mask id is then
        ``mask_token_id``, else the tokenizer's.

        Example:
            >>> predictor = MaskedPredictor.from_pretrained("/path/to/bert")  # doctest: +SKIP
        """
        transformers = require_transformers()
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(
                f"{str(path)!r} is not a local checkpoint directory (save one with "
                "model.save_pretrained(path) and tokenizer.save_pretrained(path))"
            )
        options = {"local_files_only": True, "trust_remote_code": trust_remote_code}
        tokenizer = transformers.AutoTokenizer.from_pretrained(path, **options)
        if dtype is not None:
            from packaging.version import Version  # a dependency of transformers

            # transformers 4.56 renamed torch_dtype to dtype (the old name warns since).
            new = Version(transformers.__version__) >= Version("4.56")
            options["dtype" if new else "torch_dtype"] = dtype
        try:
            model = transformers.AutoModelForMaskedLM.from_pretrained(path, **options)
        except ValueError:  # "Unrecognized configuration class ... for AutoModelForMaskedLM"
            if mask_token_id is None and not trust_remote_code:
                raise
            model = transformers.AutoModel.from_pretrained(path, **options)
            if mask_token_id is None:
                mask_token_id = getattr(tokenizer, "mask_token_id", None)
                if mask_token_id is None:
                    raise ValueError(
                        f"{type(model).__name__} is not a masked LM and its tokenizer has no mask "
                        "token: pass mask_token_id"
                    ) from None
        if device is not None:
            model = model.to(device)
        return cls(model.eval(), tokenizer, mask_token_id, device=device,
                   shift_logits=shift_logits)  # fmt: skip

    def __repr__(self) -> str:
        return (
            f"MaskedPredictor({type(self.model).__name__}, mask_token_id={self.mask_token_id}, "
            f"max_length={self.max_length}, device={self.device})"
        )

    # -- tokenization -------------------------------------------------------------------------

    def encode(self, text: str | tuple[str, str], where: str = "text") -> EncodedText:
        """Token ids and scored positions of a text, or of a ``(prompt, continuation)`` pair.

        For a pair, the prompt's tokens are context, always visible, and only the continuation
        is scored. The pair is split as lm-evaluation-harness does: trailing whitespace of the
        prompt moves to the continuation, ``prompt + continuation`` is tokenized whole, and its
        first ``len(tokenize(prompt))`` tokens are the prompt's.

        Args:
            text: a string or a ``(prompt, continuation)`` pair (an :class:`EncodedText` is
                returned as it is).
            where: how errors name the text (e.g. ``"texts[3]"``).
        """
        if isinstance(text, EncodedText):
            return text
        if isinstance(text, str):
            prompt, body = "", text
        elif (
            isinstance(text, (tuple, list))
            and len(text) == 2
            and all(isinstance(part, str) for part in text)
        ):
            prompt, body = text
            spaces = len(prompt) - len(prompt.rstrip())
            if spaces:
                prompt, body = prompt[:-spaces], prompt[-spaces:] + body
        else:
            raise TypeError(
                f"{where} must be a string or a (prompt, continuation) pair of strings, got "
                f"{text!r}"
            )
        tokens = self.tokenizer(prompt + body, return_special_tokens_mask=True)
        ids = torch.as_tensor(tokens["input_ids"], dtype=torch.long)
        # special_tokens_mask flags only the tokens the tokenizer added ([CLS], [SEP]); a special
        # token typed in the text is parsed to its id and flagged 0, so decide by id as well.
        added = torch.as_tensor(tokens["special_tokens_mask"], dtype=torch.bool)
        content = (~added).nonzero().squeeze(-1)
        prompt_tokens = 0
        if prompt:
            prompt_tokens = len(self.tokenizer(prompt, add_special_tokens=False)["input_ids"])
            content = content[prompt_tokens:]
        positions = content[~torch.isin(ids[content], self.special_ids)]
        if len(positions) == 0:
            what = "continuation" if prompt else "text"
            raise ValueError(
                f"{where} has no tokens to score (empty {what}, or special tokens only): "
                f"{text!r}"
            )
        if self.max_length is not None and len(ids) > self.max_length:
            raise ValueError(
                f"{where} has {len(ids)} tokens but the model accepts at most "
                f"{self.max_length}; split it into shorter texts"
            )
        if self.vocab_size is not None and int(ids.max()) >= self.vocab_size:
            raise ValueError(
                f"{where} has token id {int(ids.max())} but the model's vocabulary has "
                f"{self.vocab_size} entries: the tokenizer does not belong to this model"
            )
        return EncodedText(ids, positions, prompt_tokens)

    def encode_all(self, texts: Iterable[str | tuple[str, str]]) -> list[EncodedText]:
        """:meth:`encode` every text; errors name the text's index (``texts[i]``)."""
        single_pair = isinstance(texts, tuple) and len(texts) == 2 and all(
            isinstance(part, str) for part in texts
        )
        if isinstance(texts, (str, EncodedText)) or single_pair or not isinstance(
            texts, Iterable
        ):
            raise TypeError(
                "texts must be a list of strings or (prompt, continuation) pairs (wrap a single "
                "text or pair in a list)"
            )
        texts = list(texts)
        if not texts:
            raise ValueError("texts must contain at least one text")
        return [self.encode(text, f"texts[{index}]") for index, text in enumerate(texts)]

    # -- forward passes -----------------------------------------------------------------------

    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The predictor's logits ``(B, T, V)`` for unpadded ``input_ids`` ``(B, T)``."""
        if self._is_hf:
            kwargs = {"input_ids": input_ids}
            if self._attention:
                kwargs["attention_mask"] = torch.ones_like(input_ids)
            output = self.model(**kwargs)
        elif self._attention:
            output = self.model(input_ids, attention_mask=torch.ones_like(input_ids))
        else:
            output = self.model(input_ids)
        logits = getattr(output, "logits", output)
        if not (
            isinstance(logits, torch.Tensor)
            and logits.is_floating_point()
            and logits.shape[:2] == input_ids.shape
            and logits.dim() == 3
        ):
            shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits)
            raise TypeError(
                f"the predictor must return logits of shape (batch, length, vocabulary) = "
                f"({input_ids.shape[0]}, {input_ids.shape[1]}, V) (a tensor or an output with "
                f".logits), got {shape}"
            )
        if self.shift_logits:
            logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)
        return logits

    def masked_sums(
        self, text: EncodedText, masks: torch.Tensor, rows_per_batch: int | None = None
    ) -> torch.Tensor:
        r""":math:`\sum_{j \in M_s} \log p(x_j \mid x_{R_s})` for every mask ``s`` (float64, CPU).

        Args:
            text: an :class:`EncodedText`.
            masks: ``(S, D)`` boolean over the text's scored positions; True = hidden. Rows that
                hide nothing give 0 without a forward pass.
            rows_per_batch: rows per forward pass (default: all at once).

        The log-softmax is taken in float32 at the hidden positions only, and the sums are
        accumulated in float64 on the CPU.
        """
        masks = masks.cpu()
        if masks.dim() != 2 or masks.shape[-1] != len(text.positions) or masks.dtype != torch.bool:
            raise ValueError(
                f"masks must be boolean of shape (S, {len(text.positions)}), got "
                f"{masks.dtype} {tuple(masks.shape)}"
            )
        sums = torch.zeros(len(masks), dtype=torch.float64)
        todo = masks.any(-1).nonzero().squeeze(-1)
        step = len(todo) if rows_per_batch is None else rows_per_batch
        # Dropout would make the scores random. (Switching modes walks every submodule: ~0.4 ms a
        # call for a small BERT, so only when needed.)
        training = isinstance(self.model, torch.nn.Module) and self.model.training
        if training:
            self.model.eval()
        try:
            with torch.no_grad():
                for start in range(0, len(todo), max(1, step)):
                    rows = todo[start : start + step]
                    sums[rows] = self._batch_sums(text, masks[rows])
        finally:
            if training:
                self.model.train()
        return sums

    def _batch_sums(self, text: EncodedText, masks: torch.Tensor) -> torch.Tensor:
        length = len(text.input_ids)
        hidden = torch.zeros(len(masks), length, dtype=torch.bool)
        hidden[:, text.positions] = masks
        ids = text.input_ids.expand(len(masks), length).clone()
        targets = ids[hidden]
        ids[hidden] = self.mask_token_id
        logits = self.logits(ids.to(self.device))
        if int(targets.max()) >= logits.shape[-1]:
            raise ValueError(
                f"token id {int(targets.max())} but the predictor returns {logits.shape[-1]} "
                "logits per position: the tokenizer does not belong to this model"
            )
        # Normalise only where a token is hidden: the rest of the logits are never used.
        log_probs = logits[hidden.to(logits.device)].float().log_softmax(-1)
        picked = log_probs.gather(-1, targets.to(logits.device).unsqueeze(-1)).squeeze(-1)
        per_row = torch.zeros(len(masks), dtype=torch.float64)
        return per_row.index_add_(0, hidden.nonzero()[:, 0], picked.double().cpu())


def _is_pretrained_model(model) -> bool:
    try:
        from transformers import PreTrainedModel
    except ImportError:
        return False
    return isinstance(model, PreTrainedModel)

