"""The `optkit` command: bench, report, regress, env, list."""

from __future__ import annotations

import json
import sys
from typing import List, Optional

USAGE = """optkit <command> [args]

  bench [key=value ...]        run a suite (default: smoke without a GPU, e2e with one) or one point
                               e.g. optkit bench suite=e2e model=llama3_8b opt=baseline train.batch_size=4
  report RUN_DIR [RUN_DIR ...] tables (md, csv, tex) and plots under reports/<gpu>/<suite>/
  regress --baseline DIR --candidate DIR   noise-aware regression gate (exit 1 on a regression)
  env                          print the environment fingerprint (GPU, driver, versions, git SHA)
  list                         models, optimizations and suites
"""


def cmd_bench(args: List[str]) -> int:
    from optkit.bench.runner import run_sweep
    from optkit.config.compose import ConfigError

    try:
        run_sweep(args)
    except ConfigError as exc:
        print(f"optkit bench: {exc}", file=sys.stderr)
        return 2
    return 0


def cmd_env(args: List[str]) -> int:
    from optkit.measure.env import capture_env

    print(json.dumps(capture_env(), indent=2, default=str))
    return 0


def cmd_list(args: List[str]) -> int:
    from omegaconf import OmegaConf

    from optkit.config.compose import CONF_DIR, group_choices
    from optkit.opt.registry import REGISTRY
    from optkit.train.checkpointing import MODES
    from optkit.train.method import METHODS
    from optkit.train.optimizers import OPTIMIZERS

    print("models (model=NAME):")
    for name in group_choices("model"):
        family = OmegaConf.load(CONF_DIR / "model" / f"{name}.yaml").get("family")
        print(f"  {name:<22} {family}")
    print("\noptimizations (opt.KEY=true|false):")
    for name, opt in REGISTRY.items():
        needs = f"  [needs: {', '.join(opt.requires)}]" if opt.requires else ""
        print(f"  opt.{opt.config_key:<36} {opt.description}{needs}")
    print("\nopt-sets (opt=NAME):  " + ", ".join(group_choices("opt")))
    print(f"train methods: train.method={'|'.join(METHODS)}   checkpointing: train.checkpointing={'|'.join(MODES)}")
    print(f"optimizers: train.optimizer={'|'.join(OPTIMIZERS)}")
    print("\nsuites (suite=NAME):")
    for name in group_choices("suite"):
        desc = OmegaConf.load(CONF_DIR / "suite" / f"{name}.yaml").get("description", "")
        print(f"  {name:<14} {desc}")
    return 0


def cmd_report(args: List[str]) -> int:
    from optkit.report.command import main as report_main

    return report_main(args)


def cmd_regress(args: List[str]) -> int:
    from optkit.regress import main as regress_main

    return regress_main(args)


COMMANDS = {"bench": cmd_bench, "report": cmd_report, "regress": cmd_regress, "env": cmd_env, "list": cmd_list}


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"optkit: unknown command {command!r}; choose one of: {', '.join(COMMANDS)}\n\n{USAGE}", file=sys.stderr)
        return 2
    return COMMANDS[command](rest)


if __name__ == "__main__":
    sys.exit(main())
