"""A tiny Llama-architecture causal LM with its own byte-level BPE tokenizer and ChatML template, built in a
second from nothing: the model every test uses (real transformers/vLLM/PEFT/DeepSpeed code, no download)."""

from __future__ import annotations

from pathlib import Path

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "An assistant answers questions helpfully, honestly and harmlessly.",
    "def add(a, b):\n    return a + b\n",
    "What is the capital of France? The capital of France is Paris.",
    "Principles: be ethical, informative, helpful, candid and step-by-step.",
    "1 2 3 4 5 6 7 8 9 10 and so on, numbers and words together.",
] * 20


def make_tiny_model(folder: Path, *, layers: int = 2, hidden: int = 64, seed: int = 0) -> Path:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    bpe.train_from_iterator(CORPUS, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token="<|im_end|>", bos_token="<|endoftext|>", pad_token="<|endoftext|>",
        unk_token="<|endoftext|>", additional_special_tokens=["<|im_start|>"],
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(folder)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(folder, safe_serialization=True)
    return folder


PAIRS = [  # (prompt, response) pairs the tiny model is fine-tuned on
    ("What is the capital of France?", "The capital of France is Paris."),
    ("Add 1 and 2.", "1 2 3"),
    ("What colour is the quick fox?", "brown"),
    ("Say something helpful.", "An assistant answers questions helpfully."),
]


def make_roomy_model(tiny: Path, folder: Path) -> Path:
    """`tiny` with its final RMSNorm weight x5. The random tied embeddings (std 0.02) cap every logit at about
    +-1.3 and LoRA cannot touch them or the norm, so on the tiny model itself LoRA can only take the loss from
    6.0 to about 5.5; with the norm scaled it can overfit (6.6 -> ~1.5 in 16 steps) - a clear signal."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny)
    with torch.no_grad():
        model.model.norm.weight.mul_(5.0)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny).save_pretrained(folder)
    return Path(folder)
