"""The config.json of the papers' model sizes (Llama-2 7B and 70B, as meta-llama publishes them), for the tests that
plan layouts from a config alone: a folder holding nothing but the config is what `python -m align.plan --model`
reads."""

from __future__ import annotations

import json
from pathlib import Path

LLAMA_2_70B = {  # meta-llama/Llama-2-70b-hf's config.json
    "architectures": ["LlamaForCausalLM"], "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu",
    "hidden_size": 8192, "initializer_range": 0.02, "intermediate_size": 28672, "max_position_embeddings": 4096,
    "model_type": "llama", "num_attention_heads": 64, "num_hidden_layers": 80, "num_key_value_heads": 8,
    "pad_token_id": 0, "pretraining_tp": 1, "rms_norm_eps": 1e-05, "rope_scaling": None, "tie_word_embeddings": False,
    "torch_dtype": "float16", "transformers_version": "4.32.0.dev0", "use_cache": True, "vocab_size": 32000,
}
LLAMA_2_7B = {**LLAMA_2_70B, "hidden_size": 4096, "intermediate_size": 11008, "num_attention_heads": 32,
              "num_hidden_layers": 32, "num_key_value_heads": 32}


def config_folder(folder: Path, config: dict) -> Path:
    """A folder holding nothing but a config.json."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config))
    return folder
