"""The `optkit` command: bench, report, regress, env, list.

Exit codes (README, "Exit codes"): 0 every point ok, oom or skipped for a stated reason; 1 a point errored or
timed out, or optkit itself failed; 2 a usage or config error, nothing ran; 3 a results file could not be
written (disk full, read-only); 130 interrupted. A mistake is one line on stderr that names the fix;
``--debug`` (anywhere on the command line) or OPTKIT_DEBUG=1 adds the traceback.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from typing import List, Optional

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_RESULTS, EXIT_INTERRUPTED = 0, 1, 2, 3, 130

USAGE = """optkit <command> [args] [--debug]

  bench [key=value ...]        run a suite (default: smoke without a GPU, e2e with one) or one point
                               e.g. optkit bench suite=e2e model=llama3_8b opt=baseline train.batch_size=4
                               optkit bench --help [GROUP]: every group, key, type, default and meaning
  report RUN_DIR [RUN_DIR ...] tables (md, csv, tex) and plots under reports/<gpu>/<suite>/
  regress --baseline DIR --candidate DIR   noise-aware regression gate (exit 1: a regression or gate failure)
  env                          print the environment fingerprint (GPU, driver, versions, git SHA)
  list                         models, optimizations and suites

--debug or OPTKIT_DEBUG=1: tracebacks with errors. Exit codes: 0 ok, 1 a point failed, 2 usage or config
error, 3 results not writable, 130 interrupted (README: Exit codes).
"""


def cmd_bench(args: List[str]) -> int:
    if any(a in ("-h", "--help") for a in args):
        from optkit.config.help import bench_help

        wanted = next((a for a in args if not a.startswith("-") and "=" not in a), None)
        print(bench_help(wanted))
        return EXIT_OK
    problem = _not_an_override(args)
    if problem:
        print(f"optkit bench: {problem}", file=sys.stderr)
        return EXIT_USAGE
    from optkit.bench.runner import run_sweep
    from optkit.bench.summary import sweep_exit_code
    from optkit.results.rows import read_rows

    run_dir = run_sweep(args)
    rows = read_rows(run_dir / "results.jsonl", warn=lambda message: None)
    if not rows:  # e.g. a kernels suite whose process died before its first row
        print(f"optkit bench: {run_dir} holds no row: the messages above say why", file=sys.stderr)
        return EXIT_FAILED
    return sweep_exit_code(rows)


def _not_an_override(args: List[str]) -> Optional[str]:
    """Why an argument is no KEY=VALUE override (an option, a bare word), or None."""
    for arg in args:
        if arg.startswith("-") and not arg.startswith("~"):
            return f"unknown option {arg}: bench takes KEY=VALUE overrides (optkit bench --help lists them)"
        if "=" not in arg and not arg.startswith("~"):
            from optkit.config.compose import GROUPS, group_choices

            groups = [g for g in GROUPS if arg in group_choices(g)]
            hint = f"did you mean {groups[0]}={arg}?" if groups else "optkit bench --help lists the keys"
            return f"{arg!r} is not KEY=VALUE; {hint}"
    return None


def cmd_env(args: List[str]) -> int:
    from optkit.measure.env import capture_env

    print(json.dumps(capture_env(), indent=2, default=str))
    return EXIT_OK


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
    return EXIT_OK


def cmd_report(args: List[str]) -> int:
    from optkit.report.command import main as report_main

    return report_main(args)


def cmd_regress(args: List[str]) -> int:
    from optkit.regress import main as regress_main

    return regress_main(args)


COMMANDS = {"bench": cmd_bench, "report": cmd_report, "regress": cmd_regress, "env": cmd_env, "list": cmd_list}


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("OPTKIT_DEBUG", "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return EXIT_OK
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"optkit: unknown command {command!r}; choose one of: {', '.join(COMMANDS)}\n\n{USAGE}", file=sys.stderr)
        return EXIT_USAGE
    try:
        return COMMANDS[command](rest)
    except BrokenPipeError:  # `optkit list | head -2`: the reader left, nothing is wrong
        _silence_stdout()
        return EXIT_OK
    except KeyboardInterrupt:
        _explain(command, "interrupted", debug)
        return EXIT_INTERRUPTED
    except Exception as exc:  # noqa: BLE001 - every error becomes one line and an exit code
        code, message = _classify(exc)
        _explain(command, message, debug)
        return code


def _classify(exc: Exception):
    """(exit code, one-line message) of an error that reached the command line."""
    from optkit.config.compose import ConfigError
    from optkit.results.rows import ResultsFileError

    if isinstance(exc, ConfigError):
        return EXIT_USAGE, str(exc)
    if isinstance(exc, ResultsFileError):
        return EXIT_RESULTS, str(exc)
    if isinstance(exc, OSError) and exc.filename:
        return EXIT_RESULTS, f"{exc.filename}: {exc.strerror}; check its permissions, or pass another bench.results_dir"
    first = (str(exc).strip().splitlines() or [""])[0]
    return EXIT_FAILED, f"{type(exc).__name__}: {first} (optkit failed: --debug shows where)"


def _explain(command: str, message: str, debug: bool) -> None:
    if debug:
        traceback.print_exc()
    print(f"optkit {command}: {message}", file=sys.stderr, flush=True)


def _silence_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush does not fail on the closed pipe again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


if __name__ == "__main__":
    sys.exit(main())
