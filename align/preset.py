"""`python -m align.preset PRESET [--params FILE] [--check]`: lay a preset (presets/*.yaml, a partial params file
for a known layout: the CPU demo, a 7B on one GPU node, a 70B across nodes) over params.yaml.

The result is validated as a whole before anything is written, and written in place keeping params.yaml's
comments and order (ruamel.yaml's round trip, as `dvc exp run -S` edits it), so `git diff params.yaml` shows
exactly what the preset changed and `git checkout params.yaml` undoes it. `--check` validates and prints the
changes without writing. A preset may set any key params.yaml has, nested mappings merged key by key; a list
replaces the list it meets, and so does a stage's `cluster.<stage>` mapping, which is that stage's whole override of
`cluster.defaults` (so the CPU demo's preset can take a GPU preset's overrides back).
"""

from __future__ import annotations

import argparse
import io
import os
import sys
from pathlib import Path
from typing import Any

from align.errors import EXIT_USER_ERROR, UserError
from align.params import PARAMS_FILE, parse_params


def yaml_round_trip() -> Any:
    from ruamel.yaml import YAML

    yaml = YAML()  # round trip: comments, order and flow style kept
    yaml.preserve_quotes = True
    yaml.width = 120
    yaml.representer.add_representer(type(None),  # `null` as params.yaml writes it, not ruamel's empty value
                                     lambda rep, _: rep.represent_scalar("tag:yaml.org,2002:null", "null"))
    return yaml


def read_mapping(path: Path, yaml: Any) -> Any:
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    try:
        data = yaml.load(path.read_text(encoding="utf-8"))
    except Exception as exc:  # noqa: BLE001 - ruamel raises many classes; each is one line here
        raise UserError(f"{path}: not valid YAML ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") \
            from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping of parameter groups, got {type(data).__name__}")
    return data


def lay_over(target: Any, preset: Any, where: str = "") -> list[str]:
    """`preset` written into `target` in place, nested mappings key by key (but a stage's `cluster` override, which
    replaces); the dotted keys whose value changed (a new key included: the schema then checks every key)."""
    changed = []
    for key, value in preset.items():
        dotted = f"{where}{key}"
        whole = where == "cluster." and key not in ("defaults", "executor", "log_dir")  # a stage's override
        if isinstance(value, dict) and isinstance(target.get(key), dict) and value and not whole:
            changed += lay_over(target[key], value, f"{dotted}.")
        elif key not in target or target[key] != value:
            target[key] = value
            changed.append(dotted)
    return changed


def apply(preset: Path, params: Path = PARAMS_FILE, write: bool = True) -> list[str]:
    """Lay `preset` over `params` (validated whole first); the dotted keys it changed."""
    yaml = yaml_round_trip()
    current = read_mapping(params, yaml)
    changed = lay_over(current, read_mapping(preset, yaml))
    text = io.StringIO()
    yaml.dump(current, text)
    parse_params(yaml_round_trip().load(text.getvalue()), f"{params} with {preset}")
    if write and changed:
        tmp = params.with_name(f".{params.name}.preset.tmp")
        tmp.write_text(text.getvalue(), encoding="utf-8")
        os.replace(tmp, params)
    return changed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m align.preset", description=__doc__.split("\n\n")[0])
    parser.add_argument("preset", type=Path, help="a presets/*.yaml file")
    parser.add_argument("--params", type=Path, default=PARAMS_FILE, help="the params file (default: params.yaml)")
    parser.add_argument("--check", action="store_true", help="validate and list the changes; write nothing")
    args = parser.parse_args(argv)
    try:
        changed = apply(args.preset, args.params, write=not args.check)
    except UserError as exc:
        print(str(exc), file=sys.stderr)
        return EXIT_USER_ERROR
    verb = "would change" if args.check else "changed"
    print(f"{args.params}: {args.preset} {verb} {len(changed)} settings" +
          ("" if args.check or not changed else f" (git diff {args.params} shows them; git checkout {args.params} "
                                                f"undoes them)"))
    for key in changed:
        print(f"  {key}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
