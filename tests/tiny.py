"""A tiny Llama-architecture causal LM with its own byte-level BPE tokenizer and ChatML template, built in a
second from nothing: the model every test uses (real transformers/vLLM/PEFT/DeepSpeed code, no download). Beside
it, the other shapes users bring: a Llama-class base model whose tokenizer adds BOS and which has no chat template,
and a Gemma-shaped model whose template writes BOS itself and refuses a system turn."""

from __future__ import annotations

from pathlib import Path
from typing import Any

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


def bpe_tokenizer(special: list[str], **tokens: Any) -> Any:
    """A byte-level BPE tokenizer trained on CORPUS, `special` first in its vocabulary; `tokens`: the bos/eos/pad/
    unk tokens and other PreTrainedTokenizerFast options (add_bos_token)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    bpe.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, **tokens)


def save_model(folder: Path, tokenizer: Any, config: Any, seed: int) -> Path:
    """`tokenizer` and a random model of `config` (its architecture's CausalLM class) as an HF folder."""
    import torch
    from transformers import AutoModelForCausalLM

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(folder)
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder, safe_serialization=True)
    return folder


def make_tiny_model(folder: Path, *, layers: int = 2, hidden: int = 64, seed: int = 0) -> Path:
    from transformers import LlamaConfig

    tokenizer = bpe_tokenizer(SPECIAL, eos_token="<|im_end|>", bos_token="<|endoftext|>", pad_token="<|endoftext|>",
                              unk_token="<|endoftext|>", additional_special_tokens=["<|im_start|>"])
    tokenizer.chat_template = CHAT_TEMPLATE
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    return save_model(folder, tokenizer, config, seed)


LLAMA_SPECIAL = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
LLAMA3_TEMPLATE = (  # Llama 3's shape: the template writes the BOS its tokenizer also adds to any text
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)


def make_llama_base(folder: Path, *, chat_template: str | None = None, hidden: int = 64, seed: int = 0) -> Path:
    """A Llama-class base model as users bring one: the tokenizer adds BOS to every text (add_bos_token) and has
    no pad token, no chat template unless given, and the output head is not tied to the embeddings (Llama 2/3)."""
    from transformers import LlamaConfig

    tokenizer = bpe_tokenizer(LLAMA_SPECIAL, bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>",
                              add_bos_token=True)
    tokenizer.chat_template = chat_template
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    return save_model(folder, tokenizer, config, seed)


GEMMA_SPECIAL = ["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"]
GEMMA_TEMPLATE = (  # Gemma's own: BOS written, a system turn refused, turns end with <end_of_turn>
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'assistant' %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)


def make_gemma_model(folder: Path, *, hidden: int = 64, seed: int = 0) -> Path:
    """A Gemma-shaped model: GemmaForCausalLM (one key/value head, scaled embeddings, GeGLU MLP), a tokenizer that
    adds BOS, Gemma's chat template, and a chat turn ending in <end_of_turn> (an eos of its generation config)."""
    from transformers import GemmaConfig, GenerationConfig

    tokenizer = bpe_tokenizer(GEMMA_SPECIAL, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                              additional_special_tokens=["<start_of_turn>", "<end_of_turn>"], add_bos_token=True)
    tokenizer.chat_template = GEMMA_TEMPLATE
    config = GemmaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=1, head_dim=hidden // 4, max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    folder = save_model(folder, tokenizer, config, seed)
    end_of_turn = tokenizer.convert_tokens_to_ids("<end_of_turn>")
    GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=[config.eos_token_id, end_of_turn],
                     pad_token_id=config.pad_token_id).save_pretrained(folder)
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
