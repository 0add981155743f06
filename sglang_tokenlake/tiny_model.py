"""Build a tiny, deterministic Llama model + byte-level BPE tokenizer, fully offline.

Tests, demos and benchmarks serve this model on a CPU host: nothing is ever
downloaded from a model hub. Same arguments -> byte-identical weights and the
same tokenizer, so greedy outputs are reproducible across machines.

    python -m sglang_tokenlake.tiny_model --out models/tiny --dtype float32
"""

from __future__ import annotations

import argparse
import json
import os
import random
from dataclasses import dataclass
from pathlib import Path

# A fixed word list; the training corpus is sampled from it with a seeded RNG.
_WORDS = (
    "the of and to in is was that for on with as by at from it an be this which or are "
    "have not had but were his they one all there been has their more when who will no "
    "would if out so what up said about into than them can only other time new some could "
    "these two may first then do any like my now over such our man me even most made after "
    "also did many before must through back years where much your way well down should "
    "because each just those people how too little state good very make world still own "
    "see men work long get here between both life being under never day same another know "
    "while last might us great old year off come since against go came right used take "
    "three document question answer chapter section system cache prefix segment token "
    "worker memory request model server pool query value attention layer page river "
    "mountain city library garden ocean forest music history science number letter"
).split()

SIZES = {
    # name: (hidden, layers, heads, kv_heads, intermediate)
    "tiny": (64, 2, 4, 2, 128),
    "small": (128, 4, 8, 2, 256),
    "medium": (256, 6, 8, 4, 512),
}


@dataclass(frozen=True)
class TinyModelSpec:
    size: str = "tiny"
    dtype: str = "float32"
    vocab_size: int = 1024
    max_position: int = 32768
    seed: int = 0

    @property
    def dims(self) -> tuple[int, int, int, int, int]:
        if self.size not in SIZES:
            raise ValueError(f"unknown size {self.size!r}; choose from {sorted(SIZES)}")
        return SIZES[self.size]


def _corpus(seed: int, n_lines: int = 4000) -> list[str]:
    rng = random.Random(seed)
    lines = []
    for _ in range(n_lines):
        n = rng.randint(5, 30)
        lines.append(" ".join(rng.choice(_WORDS) for _ in range(n)) + ".")
    # Digits and punctuation so arbitrary prompts tokenize compactly.
    lines.append(" ".join(str(i) for i in range(1000)))
    lines.append("! ? , ; : ' \" ( ) [ ] { } - + * / = < > @ # $ % & _ ~ ` | \\")
    return lines


def build_tokenizer(spec: TinyModelSpec, out: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=spec.vocab_size,
        special_tokens=["<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(spec.seed), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        model_max_length=spec.max_position,
    )
    # No chat template: the tiny model is driven through /generate with raw text.
    fast.save_pretrained(str(out))


def build_model(spec: TinyModelSpec, out: Path) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, layers, heads, kv_heads, inter = spec.dims
    cfg = LlamaConfig(
        vocab_size=spec.vocab_size,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=spec.max_position,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=2,
        torch_dtype=spec.dtype,
    )
    torch.manual_seed(spec.seed)
    model = LlamaForCausalLM(cfg)
    # Larger-than-default init so logits are well spread and greedy choices
    # are not decided by float rounding.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                continue
            p.normal_(0.0, 0.15 if "embed" in name or "lm_head" in name else 0.08)
    model = model.to(getattr(torch, spec.dtype))
    model.save_pretrained(str(out), safe_serialization=True)


def build(spec: TinyModelSpec, out: str | os.PathLike[str], force: bool = False) -> Path:
    """Build the model into ``out`` (skipped when ``out`` already holds this spec)."""
    path = Path(out)
    stamp = path / "tokenlake_tiny_model.json"
    want = json.dumps(spec.__dict__, sort_keys=True)
    if not force and stamp.exists() and stamp.read_text() == want:
        return path
    path.mkdir(parents=True, exist_ok=True)
    build_tokenizer(spec, path)
    build_model(spec, path)
    stamp.write_text(want)
    return path


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", default="models/tiny", help="output directory (default: models/tiny)")
    p.add_argument("--size", default="tiny", choices=sorted(SIZES), help="model size")
    p.add_argument(
        "--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
        help="weight dtype (float32 for exact comparisons)",
    )
    p.add_argument("--vocab-size", type=int, default=1024)
    p.add_argument("--max-position", type=int, default=32768)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="rebuild even if up to date")
    a = p.parse_args(argv)
    spec = TinyModelSpec(a.size, a.dtype, a.vocab_size, a.max_position, a.seed)
    path = build(spec, a.out, force=a.force)
    print(f"tiny model ({spec.size}, {spec.dtype}) at {path}")


if __name__ == "__main__":
    main()
