"""Watch a trained policy (docs/training.md, "Play and videos"):

    python -m fasttd3_lora.play RUN_DIR [checkpoint=FILE] [episodes=10] [video=true] [out=FILE.mp4] [seed=0]
                                        [height=480] [width=640] [camera=0]

loads the run's latest checkpoint (or `checkpoint=`), runs `episodes` deterministic episodes of its task with the
policy export would deploy (`fasttd3_lora.export.policy_from_checkpoint`: observation normaliser and deterministic
action), prints every return and their mean, and with `video=true` writes the first episode as an mp4 (default
`RUN_DIR/videos/play_<env_step>.mp4`) at the task's control rate. DMC renders with MuJoCo's EGL or OSMesa
(`fasttd3_lora.video`; neither: one line, exit 2); Isaac Lab with its cameras and ``render_mode="rgb_array"``
(its viewer camera, `cfg.viewer`), as its own play.py does. Errors: one line, exit 2.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import torch

from fasttd3_lora.checkpoint import CheckpointError

__all__ = ["play", "main"]

EXIT_ERROR = 2
OPTIONS = {"checkpoint": str, "episodes": int, "video": bool, "out": str, "seed": int, "height": int, "width": int,
           "camera": int}  # fmt: skip
USAGE = ("usage: python -m fasttd3_lora.play RUN_DIR [checkpoint=FILE] [episodes=10] [video=true] [out=FILE.mp4] "
         "[seed=0] [height=480] [width=640] [camera=0]")  # fmt: skip


class _Policy:
    """The deployed policy with the `act` face `episode_returns` calls."""

    def __init__(self, policy: torch.nn.Module) -> None:
        self.policy = policy

    @torch.no_grad()
    def act(self, obs: torch.Tensor, deterministic: bool = True) -> torch.Tensor:
        return self.policy(obs.float().cpu())


def play(source: str | Path, *, checkpoint: str | None = None, episodes: int = 10, video: bool = False,
         out: str | Path | None = None, seed: int = 0, height: int = 480, width: int = 640,
         camera: int = 0) -> tuple[list[float], Path | None]:  # fmt: skip
    """Run the episodes (module docstring); returns the returns and the video's path (None without video)."""
    from omegaconf import OmegaConf

    from fasttd3_lora.checkpoint import load_checkpoint, resolve_checkpoint, run_dir_of
    from fasttd3_lora.config import ConfigError, upgrade_saved
    from fasttd3_lora.video import prepare_rendering, write_mp4

    path = resolve_checkpoint(checkpoint or source)
    state = load_checkpoint(path)
    meta = upgrade_saved(state["meta"])
    config = OmegaConf.create(meta["config"])
    if video and config.task.family == "dmc":
        prepare_rendering()  # before dm_control loads: MuJoCo reads MUJOCO_GL once
    from fasttd3_lora.envs import EnvRequest, env_deploy_facts, make_envs
    from fasttd3_lora.export import policy_from_checkpoint
    from fasttd3_lora.loops.kit import episode_returns

    algo = meta["config"]["algo"]
    repeat = algo.get("action_repeat") or meta.get("source", {}).get("config", {}).get("algo", {}).get("action_repeat")
    family = config.task.family
    request = EnvRequest(config.task, episodes if family == "isaaclab" else 1, int(repeat), seed, "cpu", episodes,
                         render=video)  # fmt: skip
    env, eval_env = make_envs(request)
    try:
        facts = meta.get("env") or env_deploy_facts(env)
        policy = policy_from_checkpoint(state, path, facts["observation"]["dim"], facts["action"]["dim"])
        frames: list[np.ndarray] | None = [] if video else None
        returns = episode_returns(_Policy(policy), eval_env, seed, frames, (height, width, camera))
        fps = 1.0 / eval_env.control_period
    except ValueError as err:  # a frame the env cannot give, a policy that does not fit it
        raise ConfigError(str(err).splitlines()[0]) from None
    finally:
        env.close()
        if eval_env is not env:
            eval_env.close()
    written = None
    if frames:
        run_dir = run_dir_of(path) or path.parent
        step = meta.get("counters", {}).get("env_step", 0)
        written = write_mp4(out or run_dir / "videos" / f"play_{step}.mp4", frames, fps)
    return [float(r) for r in returns.cpu()], written


def _fail(message: str) -> NoReturn:
    print(f"fasttd3-play: {message}", file=sys.stderr, flush=True)
    sys.exit(EXIT_ERROR)


def _parse(args: Sequence[str]) -> tuple[str, dict[str, Any]]:
    positional = [a for a in args if "=" not in a]
    if len(positional) != 1:
        _fail(f"expected one run directory, got {len(positional)} ({USAGE})")
    options: dict[str, Any] = {}
    for arg in (a for a in args if "=" in a):
        key, value = arg.split("=", 1)
        kind = OPTIONS.get(key)
        if kind is None:
            _fail(f"unknown option {key}=...; allowed: {', '.join(f'{k}=' for k in OPTIONS)}")
        if kind is bool:
            if value.lower() not in ("true", "false"):
                _fail(f"{key}={value}: allowed true or false")
            options[key] = value.lower() == "true"
        elif kind is int:
            if not value.isdigit() or (key in ("episodes", "height", "width") and int(value) < 1):
                _fail(f"{key}={value}: allowed an integer >= {1 if key in ('episodes', 'height', 'width') else 0}")
            options[key] = int(value)
        else:
            options[key] = value
    return positional[0], options


def main(argv: Sequence[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in args):
        print(USAGE)
        return
    source, options = _parse(args)
    from fasttd3_lora.checks import ConfigError

    try:
        returns, video = play(source, **options)
    except (ConfigError, CheckpointError) as err:
        _fail(str(err))
    for i, value in enumerate(returns):
        print(f"episode {i}: return {value:.1f}")
    print(f"mean return {np.mean(returns):.1f} ± {np.std(returns):.1f} over {len(returns)} episode(s)")
    if video is not None:
        print(f"video of episode 0: {video}")


if __name__ == "__main__":
    main()
