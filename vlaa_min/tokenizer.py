"""A small byte-level BPE tokenizer with Qwen2-VL's special tokens, built offline.

The embedded default run has no pretrained checkpoint to download, so the project trains its own tokenizer on the
toy world's texts. It is shaped like Qwen's so that every other file treats it exactly like a real Qwen2-VL /
Qwen2.5-VL tokenizer:

- byte-level BPE: any text (the system prompt's emoji, unicode, code) encodes and decodes back exactly, because
  every byte has a token;
- the same pre-tokenisation rule as Qwen (single digits, words with one leading non-letter, runs of punctuation,
  newlines kept apart);
- Qwen's special tokens: <|endoftext|> (pad), <|im_start|>, <|im_end|> (eos), <|vision_start|>, <|vision_end|>,
  <|image_pad|>, <|video_pad|>;
- <think>, </think>, <answer>, </answer> as single added tokens that are *not* special, so
  `decode(ids, skip_special_tokens=True)` keeps the tags the rewards look for;
- a ChatML chat template in Qwen2-VL's style (written here), with image content parts rendered as
  <|vision_start|><|image_pad|><|vision_end|>.

Deviations from Qwen's tokenizer: no NFC normaliser (so decode(encode(text)) == text for every string, not only
NFC ones), and the vocabulary is tiny (`vocab_size` counts the special and added tokens too, so
`len(tokenizer) <= vocab_size`; it is smaller only when the texts are too few to learn that many merges).

    tokenizer = build_tokenizer(texts, vocab_size=1024)
    ids = special_token_ids(tokenizer)        # image_token_id, eos_token_id, ... for the model config
    tokenizer.save_pretrained(path)           # AutoTokenizer.from_pretrained(path) loads it back
"""

from collections.abc import Iterable

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

PAD_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"
IMAGE_PAD = "<|image_pad|>"
VIDEO_PAD = "<|video_pad|>"
# In Qwen's id order; they are appended after the learned vocabulary, as in Qwen.
SPECIAL_TOKENS = (PAD_TOKEN, IM_START, IM_END, VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD)
# Single tokens, but ordinary text: decoding with skip_special_tokens keeps them.
TAG_TOKENS = ("<think>", "</think>", "<answer>", "</answer>")

# Qwen2's pre-tokenisation rule: contractions, a letter run with at most one leading
# non-letter (so " word" is one piece), each digit alone (numbers stay readable to the
# model), punctuation runs with their trailing newlines, newline runs, other whitespace.
PRETOKENIZE_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)"
    r"|[^\r\n\p{L}\p{N}]?\p{L}+"
    r"|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+"
    r"|\s+(?!\S)"
    r"|\s+"
)

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."

# ChatML as Qwen2-VL renders it. One line on purpose: transformers renders templates with
# trim_blocks, which would eat a newline written right after a block tag.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\n" + DEFAULT_SYSTEM_PROMPT + "<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}"
    "{{ message['content'] }}"
    "{% else %}"
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'image' or 'image' in part or 'image_url' in part %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'video' or 'video' in part %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in part %}"
    "{{ part['text'] }}"
    "{% endif %}"
    "{% endfor %}"
    "{% endif %}"
    "<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_tokenizer(texts: Iterable[str], vocab_size: int = 1024) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on `texts` and wrap it as a Qwen-style transformers tokenizer.

    Deterministic: the same texts in the same order give the same vocabulary and merges.
    """
    num_extra = len(SPECIAL_TOKENS) + len(TAG_TOKENS)
    byte_alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(byte_alphabet) + num_extra:
        raise ValueError(
            f"build_tokenizer: vocab_size={vocab_size} is too small; a byte-level vocabulary needs at "
            f"least {len(byte_alphabet)} byte tokens + {num_extra} special/tag tokens"
        )

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_PATTERN), behavior="isolated"),
            # Maps every byte to a printable character, so no text is ever out of vocabulary.
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - num_extra,
        initial_alphabet=byte_alphabet,
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer)

    bpe.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in SPECIAL_TOKENS])
    bpe.add_tokens([AddedToken(token, special=False, normalized=False) for token in TAG_TOKENS])

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        eos_token=IM_END,
        pad_token=PAD_TOKEN,
        extra_special_tokens=[IM_START, VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD],
        clean_up_tokenization_spaces=False,  # byte-level decoding is already exact
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def special_token_ids(tokenizer) -> dict[str, int]:
    """The token ids the model config and the processor need, for our tokenizer or a real Qwen one.

    eos_token_id is <|im_end|> (the end of a chat turn, where sampling stops) even for a base
    checkpoint whose tokenizer names <|endoftext|> as eos; pad_token_id is <|endoftext|>.
    """
    names = {
        "image_token_id": IMAGE_PAD,
        "video_token_id": VIDEO_PAD,
        "vision_start_token_id": VISION_START,
        "vision_end_token_id": VISION_END,
        "eos_token_id": IM_END,
        "pad_token_id": PAD_TOKEN,
    }
    vocab = tokenizer.get_vocab()
    missing = [token for token in names.values() if token not in vocab]
    if missing:
        raise ValueError(f"special_token_ids: the tokenizer has no {missing}; it is not a Qwen2-VL-style tokenizer")
    return {key: vocab[token] for key, token in names.items()}
