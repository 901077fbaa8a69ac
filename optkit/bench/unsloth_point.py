"""The process of an ``opt=unsloth`` point: ``import unsloth`` first, then the ordinary point.

Unsloth patches transformers' and peft's classes when it is imported, and patches less when they were
imported before it (../shared/PEERS.md). So this entry imports it before any optkit module that imports
them, then hands over to ``optkit.bench.point``'s main with the same arguments. The runner starts it instead
of optkit.bench.point for every point with opt.unsloth (bench/point_process.py), with the offline variables
and the sweep's allocator config in the environment before Python starts.

Before that, when the point can run here (unsloth installed, a CUDA GPU), a child process writes the
random-weights checkpoint Unsloth loads (bench/checkpoint_cache.py), so building the weights on the GPU
never counts in this point's memory. The process works in a scratch directory under optkit's cache:
whatever Unsloth writes to its working directory stays out of the repository.

After the point its rows get what Unsloth reported (the layers it patched, its load time, how the import
went), its first (compiling) step as ``compile_s``, ``loss_in_forward``, and whole-step times only
(``forward_ms`` / ``backward_ms`` / ``optimizer_ms`` are None: its loss computes the LM head's gradient in
forward, so the split says nothing).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import List, Optional

OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "UNSLOTH_DISABLE_STATISTICS": "1"}
PATH_ARGS = ("--config", "--out", "--run-dir")
WHOLE_STEP_ONLY = ("forward_ms", "backward_ms", "optimizer_ms")
IMPORTED_FIRST_OF = ("transformers", "peft", "trl")


def absolute_paths(argv: List[str]) -> List[str]:
    """``argv`` with the values of the path arguments made absolute (the process changes directory)."""
    out = list(argv)
    for i, item in enumerate(out):
        flag, eq, value = item.partition("=")
        if flag in PATH_ARGS and eq:
            out[i] = f"{flag}={Path(value).resolve()}"
        elif item in PATH_ARGS and i + 1 < len(out):
            out[i + 1] = str(Path(out[i + 1]).resolve())
    return out


def can_run_here() -> bool:
    import torch  # torch may come before unsloth; transformers and peft may not

    return importlib.util.find_spec("unsloth") is not None and torch.cuda.is_available()


def import_unsloth() -> str:
    """Import unsloth now; returns one line saying how that went (it goes into the rows' patch log)."""
    before = [name for name in IMPORTED_FIRST_OF if name in sys.modules]
    try:
        import unsloth  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - the point's row says what failed
        first = (str(exc).splitlines() or [""])[0][:300]
        return f"import unsloth failed: {type(exc).__name__}: {first}"
    if before:
        return f"imported after {', '.join(before)}: Unsloth patches less (a bug in optkit's entry)"
    return f"imported before {', '.join(IMPORTED_FIRST_OF)}"


def write_checkpoint(config_path: str) -> None:
    """The point's random-weights checkpoint, by a child process (its GPU memory is gone when it exits).
    A failure here is not fatal: the point writes it itself, and its row says why that failed."""
    subprocess.run([sys.executable, "-m", "optkit.bench.checkpoint_cache", "--config", config_path], check=False)


def finish_rows(out: Path, import_note: Optional[str]) -> None:
    """Add what Unsloth reported to the rows the point wrote to ``out``."""
    from optkit.opt.unsloth_peer import BUILD

    if not out.is_file():
        return
    rows = json.loads(out.read_text())
    for row in rows:
        row["unsloth_patched_layers"] = BUILD.get("unsloth_patched_layers")
        row["unsloth_load_s"] = BUILD.get("unsloth_load_s")
        if import_note:
            row["patch_log"] = [f"unsloth: {import_note}", *(row.get("patch_log") or [])]
        if row.get("status") == "ok":
            row["compile_s"] = row.get("first_step_s")
            row["loss_in_forward"] = True
            row.update(dict.fromkeys(WHOLE_STEP_ONLY))
    out.write_text(json.dumps(rows))


def main(argv: Optional[List[str]] = None) -> int:
    argv = absolute_paths(list(sys.argv[1:] if argv is None else argv))
    parser = argparse.ArgumentParser(add_help=False)
    for flag in PATH_ARGS:
        parser.add_argument(flag)
    args, _ = parser.parse_known_args(argv)
    for key, value in OFFLINE_ENV.items():  # the runner sets them before Python starts; a direct call gets them here
        os.environ.setdefault(key, value)
    if args.config and can_run_here():
        write_checkpoint(args.config)
    from optkit.bench.checkpoint_cache import cache_root

    scratch = cache_root() / "unsloth-work"
    scratch.mkdir(parents=True, exist_ok=True)
    os.chdir(scratch)
    import_note = import_unsloth() if importlib.util.find_spec("unsloth") is not None else None
    from optkit.bench import point

    code = point.main(argv)
    if args.out:
        finish_rows(Path(args.out), import_note)
    return code


if __name__ == "__main__":
    sys.exit(main())
