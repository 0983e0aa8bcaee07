"""The tiny preset's tokenizer: a byte-level BPE trained offline on environment text, ChatML.

Trained with a vocabulary large enough that (almost) every word of the environment corpus
becomes one token, so prompts stay short, while the byte-level alphabet still round-trips any
text. Special tokens: ``<|endoftext|>``, ``<|im_start|>``, ``<|im_end|>``, ``<|pad|>``.
"""
from __future__ import annotations

from typing import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
PAD = "<|pad|>"
SPECIAL_TOKENS = [ENDOFTEXT, IM_START, IM_END, PAD]

# ChatML, as Qwen2 uses it (without the default system prompt, to keep tiny prompts short).
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def train_tokenizer(corpus: Iterable[str], vocab_size: int = 2048, min_frequency: int = 1,
                    ) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on ``corpus`` and wrap it as a ChatML ``PreTrainedTokenizerFast``.

    ``vocab_size`` is an upper bound (training stops when no pair is left to merge); it
    includes the 256 byte symbols and the 4 special tokens. Padding side is left, as
    batched generation needs. ``eos_token`` is ``<|im_end|>`` so generation stops at the end
    of an assistant turn.
    """
    if not isinstance(vocab_size, int) or vocab_size < 256 + len(SPECIAL_TOKENS) + 1:
        raise ValueError(f"vocab_size={vocab_size!r} is invalid; expected an int >= "
                         f"{256 + len(SPECIAL_TOKENS) + 1} (256 bytes + special tokens + merges)")
    texts = [t for t in corpus if t]
    if not texts:
        raise ValueError("corpus is empty; pass an iterable of non-empty strings (environment text)")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return wrap_tokenizer(tok)


def wrap_tokenizer(tok: Tokenizer) -> PreTrainedTokenizerFast:
    """Wrap a raw ``tokenizers.Tokenizer`` with the ChatML template and special tokens."""
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=None, eos_token=IM_END, pad_token=PAD,
        unk_token=None, additional_special_tokens=[ENDOFTEXT, IM_START],
        padding_side="left", clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHATML_TEMPLATE
    return fast


def tokens_per_word(tokenizer: PreTrainedTokenizerFast, texts: Iterable[str]) -> float:
    """Mean number of tokens per whitespace-separated word over ``texts`` (1.0 = word level)."""
    words = tokens = 0
    for text in texts:
        words += len(text.split())
        tokens += len(tokenizer(text, add_special_tokens=False)["input_ids"])
    return tokens / max(words, 1)
