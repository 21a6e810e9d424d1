"""The training app: `python -m fasttd3_lora.train [key=value ...]` (or `fasttd3-train`); docs/training.md.

The command line only. `main` checks the command line first (group choices, key names, values, the device,
the checkpoint to resume) and stops with one line and exit code 2 before any work starts. It then hands the
overrides to Hydra, whose job runs `fasttd3_lora.runner.train`: the algorithm's loop (`fasttd3_lora.loops.*`,
chosen by `algo=`, `fasttd3_lora.algorithms`) with its run directory, metrics, checkpoints and exact resume.
Exit codes: 2 a bad command line, config value or checkpoint; 3 the non-finite guard stopped the run; 130 Ctrl-C.
"""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

import hydra
from hydra._internal.utils import get_args_parser
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, open_dict

from fasttd3_lora.checkpoint import CheckpointError, load_checkpoint, resolve_checkpoint, run_dir_of
from fasttd3_lora.config import (
    RESUME_KEEPS,
    ConfigError,
    check_device,
    check_overrides,
    check_resume_compatible,
    compose_config,
    drop_override,
    drop_unused_groups,
    expand_shorthands,
    merge_overrides,
    override_value,
    upgrade_saved,
    validate_config,
)
from fasttd3_lora.threads import AUTO
from fasttd3_lora.loops.kit import NonFiniteError
from fasttd3_lora.run_status import read_status, write_status
from fasttd3_lora.runner import train

__all__ = ["EXIT_CONFIG", "EXIT_NONFINITE", "EXIT_INTERRUPTED", "prepare_command_line", "main"]

EXIT_CONFIG = 2  # bad command line, config value or checkpoint
EXIT_NONFINITE = 3  # the guard stopped a run
EXIT_INTERRUPTED = 130  # Ctrl-C


def _fail(code: int, err: BaseException) -> NoReturn:
    print(f"fasttd3-train: {err}", file=sys.stderr, flush=True)
    sys.exit(code)


def _quote(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _fresh_dir(path: Path) -> Path:
    """`path`, or `path_2`, `path_3`, ... if it exists: a new run never writes into another run's directory."""
    candidate, n = path, 1
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.name}_{n}")
    return candidate


def prepare_command_line(argv: Sequence[str]) -> list[str]:
    """Check the command line and return the one Hydra runs: a resumed run gets its original overrides (the new
    ones win) and its own run directory; a new run a directory that does not exist yet.

    Raises `ConfigError` / `CheckpointError` (one line). Hydra's informational modes (--help, --cfg, ...) and
    other config directories pass through unchecked."""
    argv = expand_shorthands(argv)
    args = get_args_parser().parse_args(list(argv))
    if any((args.help, args.hydra_help, args.cfg, args.info, args.shell_completion, args.config_path,
            args.config_name, args.config_dir, args.experimental_rerun)):  # fmt: skip
        return list(argv)
    resume = override_value(args.overrides, "resume")
    if args.multirun:  # every job is validated when it starts; the sweep gets a directory of its own
        check_overrides(args.overrides)
        if resume is not None:
            raise ConfigError(f"resume={resume}: not allowed with --multirun (resume each run on its own)")
        # hydra/launcher=... selects the group that hydra.launcher.* keys then override: keep both
        hydra_overrides = [o for o in args.overrides if o.startswith(("hydra.", "hydra/"))]
        sweep_dir = _fresh_dir(Path(compose_config(hydra_overrides, check=False, with_hydra=True).hydra.sweep.dir))
        return [*argv, f"hydra.sweep.dir={_quote(str(sweep_dir))}"]
    overrides, run_dir, saved = list(args.overrides), None, None
    if resume is not None:
        checkpoint = resolve_checkpoint(str(resume))
        saved = upgrade_saved(load_checkpoint(checkpoint, mmap=True)["meta"])  # mmap: the buffer is not read here
        overrides = merge_overrides(saved["overrides"], overrides)
        run_dir = run_dir_of(checkpoint)
    cfg = compose_config(overrides, with_hydra=True)
    template = Path(cfg.hydra.run.dir)
    with open_dict(cfg):
        del cfg["hydra"]
    check_device(cfg.device)
    if saved is not None:
        check_resume_compatible(OmegaConf.to_container(drop_unused_groups(cfg.copy()), resolve=True), saved["config"])
        for key in RESUME_KEEPS:
            recorded = saved["config"].get(key)
            if override_value(overrides, key) is None and recorded not in (None, AUTO):
                overrides.append(f"{key}={recorded}")
    run_dir = run_dir or _fresh_dir(template)
    return [*overrides, f"hydra.run.dir={_quote(str(run_dir))}"]


@hydra.main(config_path="pkg://fasttd3_lora.configs", config_name="config", version_base="1.3")
def _hydra_job(cfg: DictConfig) -> None:
    hydra_cfg = HydraConfig.get()
    try:
        validate_config(cfg)  # multirun jobs reach here unchecked
        train(cfg, hydra_cfg.runtime.output_dir, drop_override(list(hydra_cfg.overrides.task), "resume"))
    except (ConfigError, CheckpointError, NonFiniteError) as err:
        code = EXIT_NONFINITE if isinstance(err, NonFiniteError) else EXIT_CONFIG
        if hydra_cfg.mode == RunMode.MULTIRUN:
            # A failed job must not end the sweep: Hydra records the exception, runs the remaining jobs, then
            # re-raises the first failure (exit status 1). The run's status.json keeps the reason.
            print(f"fasttd3-train: {err}", file=sys.stderr, flush=True)
            if read_status(hydra_cfg.runtime.output_dir) is None:  # refused before train() started
                write_status(hydra_cfg.runtime.output_dir, "error", str(err))
            raise
        _fail(code, err)
    except KeyboardInterrupt as err:
        _fail(EXIT_INTERRUPTED, err)


def main(argv: Sequence[str] | None = None) -> None:
    """Console entry point (`fasttd3-train`, `python -m fasttd3_lora.train`)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        argv = prepare_command_line(argv)
    except (ConfigError, CheckpointError) as err:
        _fail(EXIT_CONFIG, err)
    if int(os.environ.get("RANK", "0")) > 0:
        # torchrun: rank 0 owns the run directory (and names it); the other ranks write nothing there, and a
        # directory of their own keeps Hydra's files from racing rank 0's (docs/fasttd3.md, "Multi-GPU").
        scratch = tempfile.mkdtemp(prefix=f"fasttd3-rank{os.environ['RANK']}-")
        argv = [*drop_override(argv, "hydra.run.dir"), f"hydra.run.dir={_quote(scratch)}"]
    sys.argv = [sys.argv[0], *argv]  # Hydra reads its command line from sys.argv
    _hydra_job()


if __name__ == "__main__":
    main()
