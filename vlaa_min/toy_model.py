"""The toy world's starting checkpoint: a tokenizer trained on the toy texts and a tiny random Qwen2.5-VL (or Qwen3-VL).

No weights can be downloaded here, so the embedded default starts from scratch: a byte-level BPE trained on every
text of the toy world (questions, answers, traces, the system prompt) with Qwen's special tokens, and a ~1M
parameter Qwen2.5-VL-shaped model (ModelConfig.tiny; --model-type qwen3_vl for a Qwen3-VL-shaped one, with
DeepStack) with random weights. Both are written as one directory laid
out exactly like a real Qwen checkpoint (config.json, model.safetensors, tokenizer files,
preprocessor_config.json), so the toy model and Qwen2.5-VL-3B load through the same functions. `make base` then
trains it into the toy "instruct" base with train_sft.py.

    python -m vlaa_min.toy_model --data toy --out runs/toy-init [--model-type qwen3_vl]
"""

import glob
import json
import os

import torch

from vlaa_min.config import MODEL_TYPES, ModelConfig
from vlaa_min.infra.cli import FlagParser
from vlaa_min.model import VLModel
from vlaa_min.processor import SYSTEM_PROMPT, ImageProcessor, Processor
from vlaa_min.tokenizer import build_tokenizer, special_token_ids


def corpus_texts(data_dir: str) -> list[str]:
    """Every text a toy model reads or writes: the system prompt and each record's question and targets.

    Each record counts once: a file that repeats records of another (sft_verified.json, a subset of sft.json)
    adds nothing, so the tokenizer does not change when such a file is added to the world.
    """
    texts, seen = [SYSTEM_PROMPT], set()
    for path in sorted(glob.glob(os.path.join(data_dir, "*.json"))):
        with open(path) as f:
            records = json.load(f)
        if not isinstance(records, list):
            continue  # the world.json manifest
        for record in records:
            key = (record.get("id"), record.get("answer"))
            if key in seen:
                continue
            seen.add(key)
            meta = record.get("meta", {})
            texts += [record["question"], record["gt"], record.get("answer", ""),
                      meta.get("direct_answer", ""), meta.get("pseudo_answer", "")]
    return [t for t in texts if t]


# Weight init std of the toy model. Qwen's 0.02 suits d_model >= 1024; at d_model = 128 it starts every attention
# logit near 0, and training sits on a long plateau where the model ignores the question (it cannot copy
# "triangle" from "What color is the triangle?" into "The triangle is ..."). At 0.1 the logits start at std ~1.
TOY_INIT_STD = 0.1


def build_toy_checkpoint(out: str, data_dir: str, model_type: str = "qwen2_5_vl", vocab_size: int = 1024,
                         seed: int = 0, init_std: float = TOY_INIT_STD, **overrides) -> str:
    texts = corpus_texts(data_dir)
    if len(texts) < 2:
        raise FileNotFoundError(f"no toy records under {data_dir}: run `make data` (python toyworld.py) first")
    tokenizer = build_tokenizer(texts, vocab_size=vocab_size)
    ids = special_token_ids(tokenizer)
    config = ModelConfig.tiny(model_type=model_type, vocab_size=len(tokenizer), text_initializer_range=init_std,
                              **ids, **overrides)
    torch.manual_seed(seed)
    model = VLModel(config)
    model.save_pretrained(out)
    Processor(tokenizer, ImageProcessor.for_model(config)).save_pretrained(out)
    print(f"wrote {out}: {model_type}, {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
          f"vocabulary {len(tokenizer)} (trained on {len(texts)} toy texts)")
    return out


def main() -> None:
    parser = FlagParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default="toy", help="toy world directory (its *.json records train the tokenizer)")
    parser.add_argument("--out", default="runs/toy-init", help="checkpoint directory to write")
    parser.add_argument("--model-type", default="qwen2_5_vl", choices=MODEL_TYPES, help="the family to build")
    parser.add_argument("--vocab-size", type=int, default=1024, help="upper bound of the BPE vocabulary")
    parser.add_argument("--seed", type=int, default=0, help="weight init seed")
    parser.add_argument("--init-std", type=float, default=TOY_INIT_STD, help="weight init std (Qwen: 0.02)")
    args = parser.parse_args()
    build_toy_checkpoint(args.out, args.data, args.model_type, args.vocab_size, args.seed, args.init_std)


if __name__ == "__main__":
    main()
