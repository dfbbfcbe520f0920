"""The policy's LoRA update reaching a merging vLLM engine (`rl.rollout_adapter: merged`) two ways, side by side:
through the filesystem (the trainer writes the adapter folder, the engine's workers read it back and merge) and over
a process group (align/weight_sync.py: the trainer broadcasts the LoRA factors, the workers receive and merge).
Both merge onto the base layers read from the node-local copy the engine made at start. Each repeat changes the
adapter (a new update, as after an RL step), syncs it, then answers one 1-token request, which is timed alone too;
the paths alternate and the table quotes medians. Prints a table, writes bench/results/weight_sync.json.

    python bench/weight_sync.py [--model models/sft/model] [--repeats 5]

The default model is the SFT policy the pipeline trains (`dvc repro engrave` first), else the imported base model;
LoRA rank, alpha and targets are params.yaml's `rl.lora_r`/`rl.lora_alpha` and `training.lora_targets`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from align import params  # noqa: E402
from align.generation import Generator, Sampling  # noqa: E402
from align.records import write_json  # noqa: E402
from align.weight_sync import (  # noqa: E402
    Received, adapter_group, alongside, factors_key, lora_factors, send, spec_of,
)
from slurm.submit import free_port  # noqa: E402

ONE_TOKEN = Sampling(temperature=0.0, max_new_tokens=1)
PROMPT = ["Name a colour."]


def default_model() -> Path:
    for folder in (ROOT / "models" / "sft" / "model", ROOT / "models" / "base" / "model"):
        if (folder / "config.json").is_file():
            return folder
    sys.exit("no model folder under models/: run `dvc repro engrave` (or import_model) first, or pass --model")


def adapted(model: Path, defaults: params.Params):
    """The model with a LoRA of the policy stage's size on `training.lora_targets`, its B factors random (PEFT
    starts them at zero: an update of nothing)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    targets = defaults.training.lora_targets
    config = LoraConfig(r=defaults.rl.lora_r, lora_alpha=defaults.rl.lora_alpha, lora_dropout=0.0,
                        target_modules=targets if isinstance(targets, str) else list(targets), task_type="CAUSAL_LM")
    peft = get_peft_model(AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32), config)
    new_update(peft, 0)
    return peft


def new_update(peft, seed: int) -> None:  # noqa: ANN001
    """A different adapter, as an optimizer step makes one."""
    import torch

    rng = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, weight in peft.named_parameters():
            if "lora_B" in name:
                weight.copy_(torch.randn(weight.shape, generator=rng) * 1e-3)


def request_seconds(generator: Generator, adapter: object) -> float:
    start = time.perf_counter()
    generator.generate(PROMPT, ONE_TOKEN, adapter=adapter)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    model = args.model or default_model()
    defaults = params.load_params(ROOT / "params.yaml")
    execution = defaults.cluster.defaults.model_copy(update={"kv_cache_gb": 1, "tensor_parallel_size": 1})
    engine = params.Engine.of(defaults.generation.model_copy(update={"backend": "vllm"}), execution)
    peft = adapted(model, defaults)
    rows: dict[str, list[dict]] = {"filesystem": [], "process group": []}

    with Generator(model, engine, merge_adapters=True) as generator, \
            tempfile.TemporaryDirectory(dir=ROOT) as scratch:  # the checkout's filesystem, as models/ is
        port = free_port()
        group = alongside(lambda: adapter_group("127.0.0.1", port, 2, 0, peft.device),
                          lambda: generator.join_adapter_group("127.0.0.1", port, 2, 1))
        request_seconds(generator, None)  # warm-up
        for repeat in range(args.repeats):
            for path in rows:  # alternating, so drift in the machine's load touches both
                new_update(peft, 1 + repeat * 2 + (path == "process group"))
                start = time.perf_counter()
                if path == "filesystem":
                    folder = Path(scratch) / f"adapter_{repeat}"
                    peft.save_pretrained(folder)
                    moved = sum(f.stat().st_size for f in folder.iterdir())  # written, then read back by the engine
                    sync_and_request = request_seconds(generator, folder)
                else:
                    factors, scale = lora_factors(peft)
                    key = factors_key(factors, scale)
                    moved = alongside(lambda: send(group, factors),
                                      lambda: generator.receive_adapter(spec_of(factors), scale, key))
                    sync_and_request = request_seconds(generator, Received(key))
                total = time.perf_counter() - start
                alone = request_seconds(generator, folder if path == "filesystem" else Received(key))
                rows[path].append({"bytes": moved, "seconds": total - alone, "request_seconds": alone,
                                   "sync_and_request_seconds": sync_and_request})

    result = {"model": str(model), "lora_r": defaults.rl.lora_r, "lora_targets": defaults.training.lora_targets,
              "repeats": args.repeats, "runs": rows,
              "median": {path: {"bytes": statistics.median(r["bytes"] for r in runs),
                                "seconds": statistics.median(r["seconds"] for r in runs)}
                         for path, runs in rows.items()}}
    print(f"{model.name} ({model}), LoRA r={defaults.rl.lora_r} on {defaults.training.lora_targets}, "
          f"median of {args.repeats} alternating repeats")
    print(f"{'path':<16}{'MB moved':>10}{'s per sync':>12}")
    for path, median in result["median"].items():
        print(f"{path:<16}{median['bytes'] / 1e6:>10.2f}{median['seconds']:>12.3f}")
    write_json(ROOT / "bench" / "results" / "weight_sync.json", result)
    print(json.dumps(result["median"]))


if __name__ == "__main__":
    main()
