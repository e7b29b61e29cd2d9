"""Tiny offline language models for tests, the demo and benchmarks.

``build_tiny_llm(out_dir, texts)`` trains a byte-level BPE tokenizer on the given texts with
``tokenizers``, builds a small randomly initialised causal LM from a config (Llama, Qwen2, Mistral
or Phi-3 family), and saves both to ``out_dir``; everything downstream then loads it back through
``AutoModelForCausalLM.from_pretrained(out_dir)``, the same path a real checkpoint takes.
A tiny random model shows the mechanics, not clinical quality.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from ..utils import resource_path

TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}<|system|>\n{{ m['content'] }}\n"
    "{% elif m['role'] == 'user' %}<|user|>\n{{ m['content'] }}\n"
    "{% elif m['role'] == 'assistant' %}<|assistant|>\n{{ m['content'] }}<|end|>\n"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
SPECIAL_TOKENS = ["<|pad|>", "<|bos|>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>"]
FAMILIES = ("llama", "qwen2", "mistral", "phi3")


def train_tokenizer(texts: Iterable[str], vocab_size: int = 1024, chat_template: bool = True):
    """Byte-level BPE trained on ``texts`` -> ``PreTrainedTokenizerFast`` with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(list(texts), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|end|>",
                                   pad_token="<|pad|>")
    fast.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS[3:]})
    if chat_template:
        fast.chat_template = TINY_CHAT_TEMPLATE
    return fast


def tiny_llm_config(family: str, vocab_size: int, hidden: int = 64, layers: int = 2, heads: int = 4,
                    kv_heads: int = 2, intermediate: int | None = None, max_positions: int = 1024, **extra):
    """A small config of one of the supported families."""
    from transformers import AutoConfig

    if family not in FAMILIES:
        raise ValueError(f"unknown family '{family}'; known: {FAMILIES}")
    kw = dict(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=intermediate or 2 * hidden,
              num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
              max_position_embeddings=max_positions, tie_word_embeddings=False)
    kw.update(extra)
    return AutoConfig.for_model(family, **kw)


def build_tiny_llm(out_dir: str | Path, texts: Iterable[str], family: str = "llama", vocab_size: int = 1024,
                   hidden: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 2, seed: int = 0,
                   chat_template: bool = True, **extra) -> Path:
    """Train a tokenizer, build a random tiny causal LM, save both to ``out_dir``; returns the folder."""
    import torch
    from transformers import AutoModelForCausalLM

    out = Path(out_dir)
    tok = train_tokenizer(texts, vocab_size=vocab_size, chat_template=chat_template)
    cfg = tiny_llm_config(family, len(tok), hidden=hidden, layers=layers, heads=heads, kv_heads=kv_heads, **extra)
    cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    model.generation_config.bos_token_id = tok.bos_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


def sample_texts(root: str | Path | None = None) -> list[str]:
    """Text of the bundled sample (VQA-RAD questions/answers, SMILES, prompts) for tokenizer training.

    Args:
        root: a folder laid out like ``data/sample``; default: the sample medmm ships (checkout or wheel).
    """
    import csv
    import json

    root = Path(root) if root else resource_path("data/sample")
    texts = [
        "What is the imaging modality? Is there an abnormality? Describe the findings. Answer yes or no.",
        "Is this molecule likely to be approved as a drug? Does this DNA sequence contain a promoter?",
        "The image shows a CT scan of the head. The lungs are clear. No acute abnormality. MR brain.",
    ]
    qa = root / "vqa_rad" / "testset.json"
    if qa.exists():
        for q in json.loads(qa.read_text()):
            texts.append(f"{q['question']} {q['answer']}")
    mol = root / "molecules" / "clintox_sample.csv"
    if mol.exists():
        with open(mol) as f:
            texts.extend(r["smiles"] for r in csv.DictReader(f))
    return texts
