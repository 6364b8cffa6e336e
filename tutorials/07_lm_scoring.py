# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 6. Scoring a language model over a corpus
#
# A masked language model (BERT and friends) or a masked diffusion LM (MDLM, LLaDA, Dream) predicts
# hidden tokens from visible ones. Write $S(x; m)$ for the mean log-probability of a hidden token
# when $m$ of a text's $D$ tokens are hidden (averaged over which ones). Then
#
# $$
# \sum_{m=1}^{D} S(x; m)
# $$
#
# is the text's log-likelihood under the model's chain rule averaged over every order of the
# tokens, and it is exactly minus the NELBO a masked diffusion LM is trained on. The $m = 1$ term
# times $D$ is the pseudo-log-likelihood (PLL) that masked LMs are usually scored with.
# `pyro-mpt score` estimates the sum per text, without bias and with a standard error, and writes
# the PLL and the whole curve $S(x; m)$ alongside.
#
# This tutorial
#
# 1. makes a local checkpoint (a small BERT that learns a toy grammar in about 15 seconds; with a
#    checkpoint of your own, start at step 2);
# 2. scores a text file with `pyro-mpt score` and reads the JSONL it writes;
# 3. plots the curve;
# 4. scores continuations given prompts, the question lm-evaluation-harness asks.

# %%
import json
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path

import matplotlib.pyplot as plt
import torch
from transformers import BertConfig, BertForMaskedLM

from pyro_mpt.lm import MaskedPredictor, score_texts
from pyro_mpt.mlm import word_level_tokenizer

torch.manual_seed(0)
torch.set_num_threads(1)
rng = random.Random(0)

# %% [markdown]
# ## 1. A checkpoint
#
# Sentences from a small grammar: who did what to what, and when. The words that follow "sat" or
# "jumped" are predictable from their neighbours, the subject is not; so a trained model predicts a
# hidden token much better when the tokens around it are visible, and its curve falls as more of
# the text is hidden.

# %%
SUBJECTS = ["the cat", "a dog", "the quick fox", "two birds", "my old friend", "the teacher",
            "a small child"]  # fmt: skip
VERBS = ["sat on", "ran across", "jumped over", "slept under", "looked at", "walked to"]
OBJECTS = ["the mat", "the park", "a lazy dog", "the green hill", "an old house", "the river"]
TIMES = ["", " in the morning", " at night", " after lunch", " every day"]


def sentence() -> str:
    return (f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)}"
            f"{rng.choice(TIMES)}.")  # fmt: skip


def text() -> str:
    return " ".join(sentence() for _ in range(rng.randint(1, 3)))


train = [text() for _ in range(3000)]
held_out = [text() for _ in range(24)]
print(held_out[0])

# %% [markdown]
# A BERT-style tokenizer whose vocabulary is the grammar's words, and a two-layer BERT trained with
# *cumulative* masking: each text hides a fraction of its tokens drawn uniformly from (0, 1), so
# that every masking rate is learned (the objective the score measures), not only BERT's 15%.

# %%
tokenizer = word_level_tokenizer(train)
config = BertConfig(vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2,
                    num_attention_heads=2, intermediate_size=256, max_position_embeddings=64,
                    hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)  # fmt: skip
model = BertForMaskedLM(config)
encoded = [torch.tensor(ids) for ids in tokenizer(train)["input_ids"]]
special = torch.tensor([tokenizer.pad_token_id, tokenizer.cls_token_id, tokenizer.sep_token_id])
steps = 700
optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, 3e-3, total_steps=steps)
for step in range(steps):
    rows = [encoded[i] for i in torch.randint(len(encoded), (32,))]
    ids = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True,
                                          padding_value=tokenizer.pad_token_id)  # fmt: skip
    rate = torch.rand(len(rows), 1)  # one masking rate per text
    hidden = ~torch.isin(ids, special) & (torch.rand(ids.shape) < rate)
    loss = model(input_ids=ids.masked_fill(hidden, tokenizer.mask_token_id),
                 attention_mask=(ids != tokenizer.pad_token_id).long(),
                 labels=torch.where(hidden, ids, -100)).loss  # fmt: skip
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    schedule.step()
    if step % 175 == 0 or step == steps - 1:
        print(f"step {step:4d}  masked-token loss {loss.item():.3f}")

os.chdir(tempfile.mkdtemp(prefix="pyro-mpt-lm-"))  # a scratch folder for the files below
checkpoint = Path("checkpoint")
model.save_pretrained(checkpoint)
tokenizer.save_pretrained(checkpoint)
Path("texts.txt").write_text("\n".join(held_out) + "\n")

# %% [markdown]
# ## 2. Score a text file
#
# One text per line in, one JSON line per text out. `--target-stderr 0.05 --per-token` keeps
# drawing masks for a text until the standard error of its score is at most 0.05 nats per token
# (or `--max-masks` is reached, which the line then says); `--curve` adds the curve. In a shell:
#
# ```bash
# pyro-mpt score checkpoint texts.txt --out scores.jsonl --curve --target-stderr 0.05 --per-token
# ```
#
# Run it again after an interruption and it scores only the texts missing from `scores.jsonl`.
# On several GPUs the same command runs under `accelerate launch --num_processes 8 -m
# pyro_mpt.cli score ...`; each text's masks are seeded by its index, so the file is the same.

# %%
command = [sys.executable, "-m", "pyro_mpt.cli", "score", "checkpoint", "texts.txt",
           "--out", "scores.jsonl", "--curve", "--target-stderr", "0.05", "--per-token",
           "--no-progress"]  # fmt: skip
print(subprocess.run(command, check=True, capture_output=True, text=True).stdout)
scores = [json.loads(line) for line in Path("scores.jsonl").read_text().splitlines()]
print(json.dumps({k: v for k, v in scores[0].items() if k != "curve"}, indent=1))

# %% [markdown]
# Per token, the PLL is the score with almost all the context (only one token hidden at a time);
# `log_prob` averages over every amount of context, so it is lower. Both are in nats.

# %%
print(f"{'tokens':>6} {'PLL/token':>10} {'log p/token':>12} {'± s.e.':>7} {'masks':>6}")
for record in scores[:8]:
    d = record["tokens"]
    print(f"{d:6d} {record['pll'] / d:10.3f} {record['log_prob'] / d:12.3f} "
          f"{record['stderr'] / d:7.3f} {record['masks']:6d}")
assert all(record["target_met"] for record in scores)
mean_pll = sum(r["pll"] / r["tokens"] for r in scores) / len(scores)
mean_log_prob = sum(r["log_prob"] / r["tokens"] for r in scores) / len(scores)
print(f"mean over {len(scores)} texts: PLL {mean_pll:.3f}, log p {mean_log_prob:.3f} nats/token")

# %% [markdown]
# ## 3. The curve
#
# `curve` holds, per stratum of mask sizes `low..high` (one size per stratum for texts of up to
# 32 tokens), the mean of $S(x; m)$ and its standard error. Put on a common axis, the masking rate
# $m / D$, the texts' curves show how much each token's prediction relies on context: here from
# about −1 nat with everything else visible to −2 with almost nothing visible. The area
# under each curve (its sum over $m$) is the text's `log_prob`.

# %%
fig, ax = plt.subplots(figsize=(6.4, 4.0))
for record in scores:
    curve, d = record["curve"], record["tokens"]
    rates = [(lo + hi) / (2 * d) for lo, hi in zip(curve["low"], curve["high"], strict=True)]
    ax.plot(rates, curve["mean"], color="C0", alpha=0.25, lw=1)
bins = torch.linspace(0, 1, 11)
points = torch.tensor([[(lo + hi) / (2 * r["tokens"]), s]
                       for r in scores
                       for lo, hi, s in zip(r["curve"]["low"], r["curve"]["high"],
                                            r["curve"]["mean"], strict=True)])  # fmt: skip
which = torch.bucketize(points[:, 0].contiguous(), bins[1:-1])
centres = (bins[:-1] + bins[1:]) / 2
average = torch.stack([points[which == k, 1].mean() for k in range(10)])
ax.plot(centres, average, "o-", color="C3", label="mean over texts, per 10% of masking rate")
ax.set_xlabel("masking rate m / D")
ax.set_ylabel("S(x; m), nats per hidden token")
ax.set_title("Masked-prediction curve of each held-out text")
ax.legend()
fig.tight_layout()
plt.show()
assert average[0] > average[-1] + 0.5  # context helps

# %% [markdown]
# ## 4. Continuations given prompts
#
# With a JSONL input, a record `{"prompt": ..., "continuation": ...}` scores
# $\log p(\text{continuation} \mid \text{prompt})$: the prompt's tokens are always visible and only
# the continuation's are hidden. The same is available in Python through `score_texts` with
# `(prompt, continuation)` pairs. Which object did the cat sit on? (A continuation of at most six
# tokens is scored exactly, with every mask: hence the standard errors of 0.)

# %%
predictor = MaskedPredictor.from_pretrained(checkpoint)
prompt = "the cat sat on"
options = [" the mat.", " the river.", " the cat."]
results = score_texts(predictor, [(prompt, option) for option in options], seed=1)
for option, result in zip(options, results, strict=True):
    print(f"{prompt}|{option:12s} log p = {result.log_prob.mean.item():7.3f} ± "
          f"{result.log_prob.stderr.item():.3f} ({result.num_tokens} tokens scored)")
assert results[0].log_prob.mean > results[2].log_prob.mean  # "the cat" is never an object here

# %% [markdown]
# ## Other models
#
# * Any `*ForMaskedLM` checkpoint works as above.
# * A masked diffusion LM that ships its own code: `pyro-mpt score DIR texts.txt --out s.jsonl
#   --trust-remote-code --mask-token-id ID` (LLaDA's mask id is 126336); add `--shift-logits` for
#   a model whose position $i$ predicts token $i + 1$ (Dream). In Python, `MaskedPredictor` takes
#   any callable `input_ids -> logits` with an explicit `mask_token_id`, e.g. a GPT-2-tokenizer
#   model with the mask id appended to its vocabulary.
# * `--masks cumulative` (LLaDA's evaluator: a uniform number of hidden tokens, weight $L/k$) and
#   `--masks diffusion-time` (MDLM's: $t \sim U(0, 1)$, weight $1/t$) estimate the same sum with
#   more variance; `make bench` measures how much.
