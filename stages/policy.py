"""Stage `policy`: the RL step, by `policy.algorithm` - PPO, or the critic-free GRPO or RLOO, against the
instructable RM (stages/ppo.py) or DPO on the labelled pairs (stages/dpo.py). One DVC stage, so all write the same
out (models/policy) and `evaluate` does not care which ran; `dvc exp run -S policy.algorithm=dpo` switches.
"""

from __future__ import annotations

import sys

from align import runner
from align.params import load_params
from stages import dpo, ppo


def main() -> None:
    (dpo if load_params().policy.algorithm == "dpo" else ppo).main()


if __name__ == "__main__":
    sys.exit(runner.run(main))
