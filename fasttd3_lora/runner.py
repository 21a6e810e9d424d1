"""One training run from a composed config: what happens between the command line (`fasttd3_lora.train`) and an
algorithm's loop (`fasttd3_lora.loops.*`), the same for every algorithm.

`train(cfg, run_dir, overrides)` checks the device, sets torch's thread count (`threads`) and the arithmetic
(`precision`), both printed and recorded, builds the
algorithm's config once from `cfg` (the registry, `fasttd3_lora.algorithms`), hands it to the algorithm's loop,
and records how the run ended in `<run dir>/status.json` (`fasttd3_lora.run_status`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from omegaconf import DictConfig, open_dict

from fasttd3_lora.algorithms import algorithm
from fasttd3_lora.checkpoint import CheckpointError
from fasttd3_lora.config import ConfigError, check_device, drop_unused_groups
from fasttd3_lora.loops.kit import Counters, NonFiniteError
from fasttd3_lora.precision import choose_precision
from fasttd3_lora.replay import ReplayMemoryError
from fasttd3_lora.run_status import recording_outcome
from fasttd3_lora.threads import apply_threads
from fasttd3_lora.video import prepare_rendering

__all__ = ["train"]


def train(cfg: DictConfig, run_dir: str | Path, overrides: Sequence[str] = ()) -> Counters:
    """Run (or, with `cfg.resume`, continue) one training run writing into `run_dir`; returns the final counters.

    `overrides` are the command-line overrides that produced `cfg`; checkpoints store them so that
    `resume=<run dir>` rebuilds the same config. `cfg` is validated (`fasttd3_lora.config.validate_config`)."""
    check_device(cfg.device)  # multirun jobs and direct callers reach here without the command-line check
    entry = algorithm(cfg.algo.name)
    threads, why = apply_threads(cfg.threads)
    print(f"torch threads: {threads} ({why})", flush=True)
    precision, reason = choose_precision(cfg.precision, cfg.device)
    print(f"precision: {precision} ({reason})", flush=True)
    with open_dict(cfg):  # both go into config.yaml and checkpoints: a resume reuses them
        cfg.threads, cfg.precision = threads, precision
    drop_unused_groups(cfg)  # config.yaml records what configured the run, nothing else
    with recording_outcome(run_dir, NonFiniteError, (ConfigError, CheckpointError)) as outcome:
        if cfg.get("video", {}).get("every", 0) > 0:  # before any simulator loads (MuJoCo reads MUJOCO_GL once)
            print(f"videos: every {cfg.video.every} evaluation(s), MuJoCo renders with {prepare_rendering()}", flush=True)
        algo_cfg = entry.config.check_hydra(cfg)
        try:
            counters = entry.run(cfg, algo_cfg, run_dir, overrides)
        except ReplayMemoryError as err:  # known only once the env says how big a transition is
            raise ConfigError(f"algo.buffer_size={cfg.algo.buffer_size}: {err}") from None
        outcome["env_step"] = counters.env_step
    return counters
