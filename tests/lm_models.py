"""Tiny language models and tokenizers for the pyro_mpt.lm tests, built offline from configs.

* :func:`word_tokenizer` and :func:`tiny_bert`: a BERT-style masked LM and its tokenizer (as in
  ``tests/test_mlm.py``, but with a word-level vocabulary: one token per word);
  ``initializer_range=0.2`` makes the untrained conditionals far from uniform and
  context-dependent.
* :func:`gpt2_tokenizer`: a GPT-2 tokenizer (byte-level BPE trained here) with no mask token.
* :class:`TinyDenoiser`: a plain ``nn.Module`` ``input_ids -> logits`` whose vocabulary is the
  tokenizer's plus one appended mask id, as a diffusion LM built on GPT-2's tokenizer has.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import torch

SENTENCES = [
    "the cat sat on the mat",
    "a dog ran in the park",
    "the quick brown fox jumps over the lazy dog",
    "birds sing in the morning and the cat sleeps",
]

# 24 short texts from the same vocabulary, for checks that need many texts.
CORPUS = [
    "the cat sat", "a dog ran in the park", "the lazy dog sleeps", "birds sing",
    "the quick brown fox", "the cat sleeps on the mat", "a dog jumps over the cat",
    "birds sing in the park", "the fox ran", "the morning cat", "a lazy fox sat on the mat",
    "the dog and the cat", "birds in the morning", "the brown dog ran", "a cat jumps",
    "the quick dog sleeps in the park", "the mat", "a fox and a dog", "birds sat on the dog",
    "the cat ran over the lazy fox", "in the park the birds sing", "the dog sat",
    "a quick cat", "the fox sleeps in the morning",
]  # fmt: skip


def word_tokenizer():
    from pyro_mpt.mlm import word_level_tokenizer

    return word_level_tokenizer(SENTENCES + CORPUS)


def tiny_bert(tokenizer, seed: int = 0, initializer_range: float = 0.2, max_length: int = 32):
    import transformers

    config = transformers.BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=max_length,
        initializer_range=initializer_range,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)  # transformers initialises from the global generator
    return transformers.BertForMaskedLM(config).eval()


def gpt2_tokenizer(folder: Path):
    """A GPT-2 tokenizer (byte-level BPE, ``<|endoftext|>``, no mask or pad token)."""
    import transformers
    from tokenizers import ByteLevelBPETokenizer

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(SENTENCES + CORPUS, vocab_size=300, min_frequency=1,
                            special_tokens=["<|endoftext|>"], show_progress=False)  # fmt: skip
    folder.mkdir(parents=True, exist_ok=True)
    bpe.save_model(str(folder))  # vocab.json and merges.txt, as GPT-2 ships them
    return transformers.GPT2TokenizerFast.from_pretrained(folder)


class TinyDenoiser(torch.nn.Module):
    """Embeddings, one bidirectional transformer layer, logits over ``vocab_size`` ids."""

    def __init__(self, vocab_size: int, hidden: int = 32, max_length: int = 64, seed: int = 0):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.tokens = torch.nn.Embedding(vocab_size, hidden)
        self.positions = torch.nn.Embedding(max_length, hidden)
        self.layer = torch.nn.TransformerEncoderLayer(hidden, 2, 2 * hidden, dropout=0.1,
                                                      batch_first=True)  # fmt: skip
        self.out = torch.nn.Linear(hidden, vocab_size)
        with torch.no_grad():
            for parameter in self.parameters():
                parameter.copy_(torch.randn(parameter.shape, generator=generator)
                                / math.sqrt(parameter.shape[-1]))  # fmt: skip

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[-1], device=input_ids.device)
        return self.out(self.layer(self.tokens(input_ids) + self.positions(positions)))


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# A masked diffusion LM that ships its own code, as LLaDA and Dream do: loading it takes
# trust_remote_code=True and an explicit mask id (here one appended to GPT-2's vocabulary).
DIFFUSION_CODE = '''
import torch
from transformers import PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import MaskedLMOutput


class TinyDiffusionConfig(PretrainedConfig):
    model_type = "tiny-diffusion"

    def __init__(self, vocab_size=16, hidden_size=32, max_positions=64, **kwargs):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.max_positions = max_positions
        super().__init__(**kwargs)


class TinyDiffusionModel(PreTrainedModel):
    config_class = TinyDiffusionConfig

    def __init__(self, config):
        super().__init__(config)
        self.tokens = torch.nn.Embedding(config.vocab_size, config.hidden_size)
        self.positions = torch.nn.Embedding(config.max_positions, config.hidden_size)
        self.layer = torch.nn.TransformerEncoderLayer(
            config.hidden_size, 2, 2 * config.hidden_size, dropout=0.0, batch_first=True
        )
        self.out = torch.nn.Linear(config.hidden_size, config.vocab_size)
        self.post_init()

    def forward(self, input_ids, attention_mask=None):
        positions = torch.arange(input_ids.shape[-1], device=input_ids.device)
        hidden = self.layer(self.tokens(input_ids) + self.positions(positions))
        return MaskedLMOutput(logits=self.out(hidden))
'''


def save_diffusion_checkpoint(folder: Path, tokenizer, seed: int = 0):
    """Save a TinyDiffusionModel (vocabulary: the tokenizer's plus a mask id) with its code and
    the tokenizer into ``folder``; return the model."""
    import importlib.util
    import sys

    source = folder / "source" / "modeling_tiny_diffusion.py"
    source.parent.mkdir(parents=True, exist_ok=True)
    source.write_text(DIFFUSION_CODE)
    spec = importlib.util.spec_from_file_location("modeling_tiny_diffusion", source)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    module.TinyDiffusionConfig.register_for_auto_class()
    module.TinyDiffusionModel.register_for_auto_class("AutoModel")
    torch.manual_seed(seed)
    model = module.TinyDiffusionModel(
        module.TinyDiffusionConfig(vocab_size=len(tokenizer) + 1, initializer_range=0.5)
    ).eval()
    model.save_pretrained(folder / "checkpoint")  # copies the code, writes config.auto_map
    tokenizer.save_pretrained(folder / "checkpoint")
    return model
