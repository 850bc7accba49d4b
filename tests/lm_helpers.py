"""A character-level tokenizer and a bigram language model with hand-set weights: a real Hugging Face causal LM
(it trains, adapts and generates like any other) whose log-likelihoods and greedy completions are known exactly."""

from __future__ import annotations

import math

import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from helpers import VOCAB

CHARS = "\n !#$%'()*+,-./0123456789:;=?_abcdefghijklmnopqrstuvwxyz"  # 60 characters: lower-cased text fits
PAD, EOS = "<pad>", "<eos>"


def char_tokenizer() -> PreTrainedTokenizerFast:
    """One token per character of CHARS after lower-casing, plus pad (0) and EOS (1); unknown characters are pad."""
    vocab = {PAD: 0, EOS: 1, **{c: i + 2 for i, c in enumerate(CHARS)}}
    core = Tokenizer(models.WordLevel(vocab, unk_token=PAD))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token=PAD, eos_token=EOS)


def bigram_lm(transitions: dict[str, str] | None = None, *, scale: float = 4.0) -> LlamaForCausalLM:
    """A 0-layer llama whose next-token logits depend only on the current token: logit(j | i) = table[i, j].

    With hidden size = vocabulary size and one-hot embeddings, RMSNorm maps token i to sqrt(V)·e_i, so lm_head's
    weight column i is the row of logits after token i, divided by sqrt(V). Every row is uniform except that the
    token `transitions[a]` after `a` gets `scale` more: greedy decoding follows the transitions.
    """
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=VOCAB, intermediate_size=8, num_hidden_layers=0,
                         num_attention_heads=1, num_key_value_heads=1, tie_word_embeddings=False, rms_norm_eps=1e-12,
                         pad_token_id=0, eos_token_id=1, bos_token_id=None)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        model.model.embed_tokens.weight.copy_(torch.eye(VOCAB))
        model.model.norm.weight.fill_(1.0)
        model.lm_head.weight.copy_(bigram_table(transitions or {}, scale).T / math.sqrt(VOCAB))
    return model.eval()


def bigram_table(transitions: dict[str, str], scale: float) -> torch.Tensor:
    """table[i, j]: the logit of token j after token i."""
    tokenizer = char_tokenizer()
    table = torch.zeros(VOCAB, VOCAB)
    for a, b in transitions.items():
        table[tokenizer.convert_tokens_to_ids(a), tokenizer.convert_tokens_to_ids(b)] = scale
    return table
