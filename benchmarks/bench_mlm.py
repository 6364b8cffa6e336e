"""Masked LMs: the pseudo-log-likelihood of 16 texts with a small BERT, batched vs token by token.

The anchor is what PLL scorers do in their simplest form: one forward pass per masked token
(batch size 1). Ours is :func:`pyro_mpt.mlm.mlm_curve` at the smallest rate with every
single-token mask enumerated (the same numbers), in padded batches; and the cost of the whole
14-rate curve and of the cumulative :func:`~pyro_mpt.mlm.mlm_score` on the same texts.
"""

from __future__ import annotations

import torch

from .timing import best_time, row

TEXTS = [
    "Return the number of items in a container.",
    "The data set contains three classes of fifty instances each, where each class refers to a "
    "type of iris plant.",
    "Create a new temporary directory and return its absolute path name.",
    "Open a file and return a stream; raise an error upon failure.",
] * 4


def _model_and_tokenizer():
    from transformers import BertConfig, BertForMaskedLM

    from pyro_mpt.mlm import train_wordpiece_tokenizer

    tokenizer = train_wordpiece_tokenizer(TEXTS, vocab_size=500)
    config = BertConfig(
        vocab_size=len(tokenizer), hidden_size=128, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=512, max_position_embeddings=64,
    )  # fmt: skip
    torch.manual_seed(0)
    return BertForMaskedLM(config).eval(), tokenizer


def _token_by_token(model, tokenizer) -> list[float]:
    scores = []
    with torch.no_grad():
        for text in TEXTS:
            ids = torch.tensor(tokenizer(text)["input_ids"])
            total = 0.0
            for position in range(1, len(ids) - 1):
                masked = ids.clone()
                masked[position] = tokenizer.mask_token_id
                logits = model(input_ids=masked[None]).logits[0, position]
                total += logits.log_softmax(-1)[ids[position]].item()
            scores.append(total)
    return scores


def run() -> list[dict]:
    from pyro_mpt.mlm import mlm_curve, mlm_score

    model, tokenizer = _model_and_tokenizer()
    longest = max(len(tokenizer(text)["input_ids"]) for text in TEXTS)

    def pll():
        return mlm_curve(
            model, tokenizer, TEXTS, rates=[0.01], masks_per_rate=longest, batch_size=64,
            progress=False,
        )  # fmt: skip

    curve = pll()
    expected = torch.tensor(_token_by_token(model, tokenizer), dtype=torch.float64)
    assert torch.allclose(curve.mean[0] * curve.num_tokens, expected, atol=1e-4)
    anchor = best_time(lambda: _token_by_token(model, tokenizer), repeat=2)
    rows = [row("mlm", "PLL of 16 texts (batched)", best_time(pll, repeat=3), anchor,
                "token-by-token loop")]  # fmt: skip
    curve_time = best_time(
        lambda: mlm_curve(model, tokenizer, TEXTS, masks_per_rate=4, batch_size=64,
                          progress=False), repeat=2,
    )  # fmt: skip
    rows.append(row("mlm", "14-rate curve, 4 masks/rate", curve_time, anchor,
                    "token-by-token PLL"))  # fmt: skip
    score_time = best_time(
        lambda: mlm_score(model, tokenizer, TEXTS, num_masks=32, batch_size=64, progress=False),
        repeat=2,
    )
    rows.append(row("mlm", "cumulative score (32 masks) + PLL", score_time, anchor,
                    "token-by-token PLL"))  # fmt: skip
    return rows
