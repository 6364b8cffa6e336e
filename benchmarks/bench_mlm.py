"""Masked LMs: PLL throughput against two anchors, and forward passes to a given error bar.

Time (one small BERT, 16 texts, random weights: the cost of a forward pass does not depend on
them):

* PLL by :func:`pyro_mpt.mlm.mlm_curve` at the smallest rate with every single-token mask (the
  same numbers), against a token-by-token loop (one forward pass per masked token) and against a
  minicons-style batched PLL (all L masked copies of a sentence in one batch, log-softmax at the
  masked positions), with tokens scored per second;
* :func:`pyro_mpt.lm.score_texts` (stratified estimate of log p(x) to 0.05 nats/token, plus the
  PLL) and the older 14-rate curve and cumulative score, against the minicons-style PLL.

Forward passes (a BERT trained for ~20 s on text from a small grammar, so that its curve falls
from about -0.8 nats/token at 5% masked to -2 at 95%, as a real model's does; 40 held-out texts):
what it takes to reach a standard error of 0.05 nats/token on log p(x), for this library's
stratified, error-targeted sampling and for the fixed-128-draw estimators of masked diffusion
LMs, MDLM's t-sampling (t ~ U(0, 1), weight 1/t) and LLaDA's uniform size (k ~ U{1..L}, weight
L/k), whose forward passes to the target are extrapolated from the error after 128 draws
(error ~ 1/sqrt(n)). And the error per token each reaches with 128 forward passes.
"""

from __future__ import annotations

import random
import time

import torch

from .timing import best_time, count_row, row

TEXTS = [
    "Return the number of items in a container.",
    "The data set contains three classes of fifty instances each, where each class refers to a "
    "type of iris plant.",
    "Create a new temporary directory and return its absolute path name.",
    "Open a file and return a stream; raise an error upon failure.",
] * 4

TARGET = 0.05  # nats per token
FIXED = 128  # LLaDA's evaluator's Monte-Carlo draws


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


def _minicons_style(model, tokenizer) -> list[float]:
    """minicons' MaskedLMScorer in its essentials: a sentence's L masked copies in one batch."""
    scores = []
    with torch.no_grad():
        for text in TEXTS:
            ids = torch.tensor(tokenizer(text)["input_ids"])
            positions = torch.arange(1, len(ids) - 1)
            batch = ids.repeat(len(positions), 1)
            batch[torch.arange(len(positions)), positions] = tokenizer.mask_token_id
            logits = model(input_ids=batch, attention_mask=torch.ones_like(batch)).logits
            picked = logits[torch.arange(len(positions)), positions].log_softmax(-1)
            scores.append(picked.gather(-1, ids[positions, None]).sum().item())
    return scores


def _interleaved(functions, rounds: int = 5) -> list[float]:
    """Best wall time of each function, timed in turn, ``rounds`` times (after a warm-up)."""
    best = [float("inf")] * len(functions)
    for turn in range(rounds + 1):
        for k, function in enumerate(functions):
            start = time.perf_counter()
            function()
            if turn > 0:  # the first turn is the warm-up
                best[k] = min(best[k], time.perf_counter() - start)
    return best


def _grammar_texts(count: int, generator: random.Random) -> list[str]:
    subjects = ["the cat", "a dog", "the quick fox", "two birds", "my old friend", "the teacher",
                "a small child"]  # fmt: skip
    verbs = ["sat on", "ran across", "jumped over", "slept under", "looked at", "walked to"]
    objects = ["the mat", "the park", "a lazy dog", "the green hill", "an old house", "the river"]
    times = ["", " in the morning", " at night", " after lunch", " every day"]

    def sentence():
        return (f"{generator.choice(subjects)} {generator.choice(verbs)} "
                f"{generator.choice(objects)}{generator.choice(times)}.")  # fmt: skip

    return [" ".join(sentence() for _ in range(generator.randint(1, 3))) for _ in range(count)]


def _trained_model():
    """A BERT that has learned its grammar (cumulative masking, AdamW, 800 steps)."""
    from transformers import BertConfig, BertForMaskedLM

    from pyro_mpt.mlm import word_level_tokenizer

    generator = random.Random(0)
    train = _grammar_texts(3000, generator)
    held_out = _grammar_texts(40, generator)
    tokenizer = word_level_tokenizer(train)  # the same ids every run
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=256, max_position_embeddings=64,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)  # fmt: skip
    torch.manual_seed(0)
    model = BertForMaskedLM(config)
    encoded = [torch.tensor(ids) for ids in tokenizer(train)["input_ids"]]
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    steps = 800
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, 3e-3, total_steps=steps)
    sampler = torch.Generator().manual_seed(0)
    for _ in range(steps):
        rows = [encoded[i] for i in torch.randint(len(encoded), (32,), generator=sampler)]
        ids = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True,
                                              padding_value=tokenizer.pad_token_id)  # fmt: skip
        inner = ids.ne(tokenizer.pad_token_id) & ids.ne(tokenizer.cls_token_id) & ids.ne(
            tokenizer.sep_token_id
        )
        rates = torch.rand(len(rows), 1, generator=sampler)
        hidden = inner & (torch.rand(ids.shape, generator=sampler) < rates)
        labels = torch.where(hidden, ids, -100)
        output = model(input_ids=ids.masked_fill(hidden, tokenizer.mask_token_id),
                       attention_mask=ids.ne(tokenizer.pad_token_id).long(), labels=labels)
        optimizer.zero_grad()
        output.loss.backward()
        optimizer.step()
        schedule.step()
    return model.eval(), tokenizer, held_out


def _forwards_rows() -> list[dict]:
    from pyro_mpt.lm import DiffusionTime, MaskedPredictor, StratifiedBins, score_texts
    from pyro_mpt.masks import Cumulative

    model, tokenizer, texts = _trained_model()
    predictor = MaskedPredictor(model, tokenizer)
    anchors = {"uniform t, weight 1/t (MDLM)": DiffusionTime(),
               "uniform size, weight L/k (LLaDA)": Cumulative()}  # fmt: skip
    errors, per_text = {}, {}
    for name, scheme in anchors.items():
        fixed = score_texts(predictor, texts, masks=scheme, num_masks=FIXED, pll=False,
                            exhaustive_up_to=0)  # fmt: skip
        errors[name] = [s.log_prob.stderr.item() / s.num_tokens for s in fixed]
        # A t-draw that masks nothing costs no forward pass: count the share that did.
        per_text[name] = [s.forward_rows / s.num_masks for s in fixed]
    tokens = [len(predictor.encode(text).positions) for text in texts]
    about = f"mean over {len(texts)} texts, D = {min(tokens)}..{max(tokens)}"
    rows = []
    for target in (TARGET, 4 * TARGET):
        for strata in (32, 8):
            ours = score_texts(predictor, texts, masks=StratifiedBins(max_strata=strata),
                               target_stderr=target, per_token=True, pll=False)  # fmt: skip
            assert all(score.target_met for score in ours)
            forwards = sum(score.forward_rows for score in ours) / len(ours)
            for name in anchors if strata == 32 else list(anchors)[1:]:
                # Forward passes to the target, from the error after 128 draws (error ~ n^-1/2).
                needed = [FIXED * (error / target) ** 2 * share
                          for error, share in zip(errors[name], per_text[name], strict=True)]
                rows.append(count_row(
                    "mlm", f"forward passes to s.e. {target:g} nats/token on log p(x) ({about}): "
                    f"stratified ({strata} strata at most), error-targeted", forwards,
                    sum(needed) / len(needed), f"{name}, extrapolated from {FIXED} draws",
                    "forwards",
                ))  # fmt: skip
    # Equal budget: about 128 forward passes per text for the stratified estimate too.
    equal = []
    for text, size in zip(texts, tokens, strict=True):
        [score] = score_texts(predictor, [text], num_masks=max(2, FIXED // min(32, size)),
                              pll=False)  # fmt: skip
        equal.append(score.log_prob.stderr.item() / score.num_tokens)
    for name in anchors:
        rows.append(count_row(
            "mlm", f"s.e. of log p(x) per token with ~{FIXED} forward passes ({about}): "
            "stratified", sum(equal) / len(equal), sum(errors[name]) / len(errors[name]),
            f"{name}, {FIXED} draws", "nats/token",
        ))  # fmt: skip
    return rows


def run() -> list[dict]:
    from pyro_mpt.lm import MaskedPredictor, score_texts
    from pyro_mpt.mlm import mlm_curve, mlm_score

    model, tokenizer = _model_and_tokenizer()
    longest = max(len(tokenizer(text)["input_ids"]) for text in TEXTS)
    num_tokens = sum(len(tokenizer(text)["input_ids"]) - 2 for text in TEXTS)

    def pll():
        return mlm_curve(
            model, tokenizer, TEXTS, rates=[0.01], masks_per_rate=longest, batch_size=64,
            progress=False,
        )  # fmt: skip

    curve = pll()
    expected = torch.tensor(_token_by_token(model, tokenizer), dtype=torch.float64)
    assert torch.allclose(curve.mean[0] * curve.num_tokens, expected, atol=1e-4)
    assert torch.allclose(torch.tensor(_minicons_style(model, tokenizer), dtype=torch.float64),
                          expected, atol=1e-4)  # fmt: skip
    anchor = best_time(lambda: _token_by_token(model, tokenizer), repeat=2)
    predictor = MaskedPredictor(model, tokenizer)
    targeted = score_texts(predictor, TEXTS, target_stderr=TARGET, per_token=True)
    # Interleaved, best of five each: the three are close, and a busy machine drifts.
    minicons, ours, targeted_time = _interleaved([
        lambda: _minicons_style(model, tokenizer), pll,
        lambda: score_texts(predictor, TEXTS, target_stderr=TARGET, per_token=True),
    ])  # fmt: skip
    rows = [row("mlm", "PLL of 16 texts (batched)", ours, anchor, "token-by-token loop")]
    rows.append(row(
        "mlm", f"PLL of 16 texts: {num_tokens / ours:.0f} tokens/s (minicons-style "
        f"{num_tokens / minicons:.0f})", ours, minicons, "minicons-style batched PLL",
    ))  # fmt: skip
    forwards = sum(score.forward_rows for score in targeted) / len(TEXTS)
    rows.append(row(
        "mlm", f"score_texts: PLL + log p(x) to s.e. {TARGET} nats/token ({forwards:.0f} forward "
        f"rows per text; {num_tokens / targeted_time:.0f} tokens/s)", targeted_time, minicons,
        "minicons-style batched PLL",
    ))  # fmt: skip
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
    return rows + _forwards_rows()


if __name__ == "__main__":
    for result in run():
        print(result)
