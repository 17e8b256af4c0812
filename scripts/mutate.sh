#!/usr/bin/env bash
# `make mutate`: mutation testing (mutmut, configured in pyproject.toml's [tool.mutmut]) of the code that decides
# what a training step does: the learning-rate schedule, the AdamW parameter groups, the optimizer and scheduler
# set-up, gradient clipping, and the causal-LM objective with the evaluation metrics. Each mutant runs the
# non-slow tests of tests/test_training.py that reach its function. Prints the surviving mutants and the rate;
# docs/testing.md explains each survivor. Every run redoes every selected mutant (mutants/ holds the copies).
set -euo pipefail
cd "$(dirname "$0")/.."
mutants=(
    "lmforge.training.x_lr_factor__mutmut_*"
    "lmforge.training.x_param_groups__mutmut_*"
    "lmforge.training.x_make_optimizer__mutmut_*"
    "lmforge.training.x_make_scheduler__mutmut_*"
    "lmforge.training.xǁSingleProcessǁclip_grad_norm__mutmut_*"
    "lmforge.objectives.x__forward__mutmut_*"
    "lmforge.objectives.xǁCausalLMǁ*"
    "lmforge.objectives.x_confusion_matrix__mutmut_*"
    "lmforge.objectives.x_macro_f1__mutmut_*"
)
.venv/bin/mutmut run --max-children "${MUTATE_JOBS:-2}" "${mutants[@]}"
.venv/bin/mutmut results --all true | .venv/bin/python -c '
import fnmatch, sys
from collections import Counter
patterns = sys.argv[1:]
status = {}
for line in sys.stdin:
    name, sep, verdict = line.strip().rpartition(": ")
    if sep and any(fnmatch.fnmatchcase(name, p) for p in patterns):
        status[name] = verdict
counts = Counter(status.values())
survivors = sorted(n for n, v in status.items() if v != "killed")
for name in survivors:
    print(f"{status[name]:>12}  {name}")
print(", ".join(f"{v}: {n}" for v, n in counts.most_common()))
print(f"{len(survivors)} of {len(status)} mutants not killed ({len(survivors) / max(1, len(status)):.1%})")
' "${mutants[@]}"
