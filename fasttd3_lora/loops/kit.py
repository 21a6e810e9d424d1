"""The loop kit: what every training loop shares (`fasttd3_lora.loops.sac`, `fasttd3_lora.loops.fasttd3`).

* step counting and the run's events (`Counters`, `advance`: evaluation, checkpoint, end),
* episode seeds and starts, deterministic evaluation (`evaluate`),
* update metrics and the non-finite guard (`UpdateMetrics`, `reported_stops`),
* the run directory (`RunRecord`: config.yaml, metrics.csv / TensorBoard / wandb, the progress display, wall
  time, checkpoints) and resuming from a checkpoint (`load_resume`, `restore`).

Exact resume. Every checkpoint holds what is in progress (`in_progress`): the update metrics of the unfinished
log row and, where the training envs can save their running episodes (DMC with ``backend=dm_control`` in one
process: `saves_episodes`), those episodes with each env's return so far; a resumed run continues them
(`continue_episodes`), and no episode is cut. Elsewhere (EnvPool, Meta-World, Isaac Lab,
the multi-agent families, several processes) the simulator state is not saved: every checkpoint ends all training
episodes (the last transition is stored as a time-out, which bootstraps) and the next ones start from `reset`
with seeds derived from (seed, env_step). An uninterrupted run does the same at the same steps, so either way a
run resumed from a checkpoint continues bit-identically (on the same device and thread count).
"""

from __future__ import annotations

import contextlib
import dataclasses
import random
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from tensordict import TensorDict
from torch import Tensor

from fasttd3_lora.checkpoint import (
    CHECKPOINT_DIR,
    LATEST,
    atomic_write,
    capture_rng,
    copy_checkpoint,
    find_nonfinite,
    load_checkpoint,
    resolve_checkpoint,
    restore_rng,
    save_checkpoint,
)
from fasttd3_lora.config import check_resume_compatible, upgrade_saved
from fasttd3_lora.run_logging import Progress, RunLogger
from fasttd3_lora.video import VideoError

if TYPE_CHECKING:
    from torchrl.envs import EnvBase

    from fasttd3_lora.replay import NStepReplayBuffer, ReplayBuffer

__all__ = [
    "NonFiniteError",
    "Agent",
    "Counters",
    "StepEvents",
    "episode_seed",
    "crossed",
    "advance",
    "seed_everything",
    "spreads_starts",
    "start_episodes",
    "EpisodeReturns",
    "saves_episodes",
    "in_progress",
    "continue_episodes",
    "episode_returns",
    "evaluate",
    "UpdateMetrics",
    "checkpoint_state",
    "StopGuard",
    "reported_stops",
    "load_resume",
    "restore",
    "restore_on_policy",
    "RunRecord",
]


class NonFiniteError(RuntimeError):
    """A loss, a Q value or a parameter became NaN or infinite; the message names it and the step."""


class Agent(Protocol):
    """What the loop kit needs of an agent (`fasttd3_lora.sac.SAC`, `fasttd3_lora.fasttd3.FastTD3`)."""

    num_updates: int

    def act(self, obs: Tensor, deterministic: bool = False) -> Tensor: ...
    def record(self, obs: Tensor, reward: Tensor, done: Tensor) -> None: ...
    def update(self, batch: TensorDict) -> dict[str, Tensor]: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: Any) -> None: ...


@dataclasses.dataclass
class Counters:
    """Progress of a run; saved in every checkpoint (plain numbers, so weights_only loads them)."""

    env_step: int = 0
    agent_step: int = 0
    wall_time: float = 0.0  # seconds of training so far, over all resumes
    last_eval_return: float | None = None


def episode_seed(seed: int, env_step: int, stream: int) -> int:
    """Seed for the episodes that start at `env_step` (stream 0: training envs, 1: evaluation envs)."""
    return int(np.random.SeedSequence([seed, stream, env_step]).generate_state(1)[0]) % 2**31


def crossed(before: int, after: int, every: int) -> bool:
    """Whether a multiple of `every` lies in (before, after]."""
    return after // every > before // every


class StepEvents(NamedTuple):
    """What the agent step that just ended asks of a training loop."""

    end: bool  # total_env_steps reached
    evaluation: bool  # an eval_every boundary crossed (or the end)
    checkpoint: bool  # a checkpoint_every boundary crossed, an evaluation that keeps its checkpoint, or the end


def advance(counters: Counters, env_steps: int, cfg: DictConfig) -> StepEvents:
    """Count one agent step of `env_steps` simulator steps and say which of the run's events fall in it."""
    before = counters.env_step
    counters.env_step += env_steps
    counters.agent_step += 1
    end = counters.env_step >= cfg.total_env_steps
    evaluation = crossed(before, counters.env_step, cfg.eval_every) or end
    checkpoint = crossed(before, counters.env_step, cfg.checkpoint_every) or (evaluation and cfg.keep_eval_checkpoints)
    return StepEvents(end, evaluation, checkpoint or end)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def spreads_starts(env: Any) -> bool:
    """Whether the env cuts each env's first episode after a start at a random step (Isaac Lab: FastTD3's random
    start; DMC with ``task.spread_starts``), so a batch of envs does not time out together."""
    return bool(getattr(env, "spreads_starts", False))


def start_episodes(env: EnvBase, seed: int, env_step: int) -> TensorDict:
    """Reset every env from the seed of this step; returns the reset TensorDict (first observations). An env that
    spreads its episodes' clocks (`spreads_starts`) does so, from the same seed, so thousands of envs do not time
    out together and a resumed run restarts them the same way."""
    step_seed = episode_seed(seed, env_step, stream=0)
    env.set_seed(step_seed)
    td = env.reset()
    if spreads_starts(env):
        env.randomize_episode_starts(step_seed)
    return td


class EpisodeReturns:
    """Each training env's return so far, and which finished episodes a loop reports: after `restart` on envs that
    spread their episodes' clocks (`spreads_starts`) each env's first episode is cut short at random, so it is not
    reported (neither is an episode cut by a checkpoint's restart: `restart` drops it)."""

    def __init__(self, num_envs: int, device: torch.device | str) -> None:
        self.sums = torch.zeros(num_envs, device=device)
        self.counted = torch.ones(num_envs, dtype=torch.bool, device=device)

    def restart(self, env: Any, seed: int, env_step: int) -> TensorDict:
        """Every env begins a new episode (`start_episodes`, whose reset TensorDict this returns), its return at 0."""
        self.sums.zero_()
        self.counted.fill_(not spreads_starts(env))
        return start_episodes(env, seed, env_step)

    def add(self, reward: Tensor, done: Tensor) -> tuple[Tensor, Tensor] | None:
        """Add one step's rewards (num_envs,); where episodes ended (`done`), (the returns of the reported ones, the
        mask of their envs), else None (one host sync, as the loops' own check of `done`)."""
        self.sums += reward
        if not bool(done.any()):
            return None
        reported = done & self.counted
        finished = self.sums[reported]
        self.counted |= done
        self.sums.masked_fill_(done, 0.0)
        return finished, reported

    @staticmethod
    def row(finished: Tensor) -> dict[str, float]:
        """The metrics row's ``episode_return``: the mean of the reported returns (none: no entry)."""
        return {"episode_return": finished.mean().item()} if len(finished) else {}

    def state_dict(self) -> dict[str, Tensor]:
        return {"sums": self.sums.clone(), "counted": self.counted.clone()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.sums.copy_(state["sums"])
        self.counted.copy_(state["counted"])


def saves_episodes(env: Any, world_size: int = 1) -> bool:
    """Whether this run's checkpoints keep the training envs' running episodes (module docstring): envs that can
    snapshot them (`fasttd3_lora.tasks.dmc.DMCEnv` on dm_control), in a one-process run (a checkpoint holds one
    process's envs)."""
    return world_size == 1 and bool(getattr(env, "can_snapshot", False))


def in_progress(env: Any, keeps_episodes: bool, returns: EpisodeReturns, *rows: UpdateMetrics) -> dict[str, Any]:
    """What a checkpoint keeps of the work in progress: the sums of the unfinished log rows (`rows`) and, with
    `keeps_episodes` (`saves_episodes`), the training envs' running episodes and their returns so far."""
    return {"rows": [row.state_dict() for row in rows],
            "env": env.snapshot() if keeps_episodes else None,
            "returns": returns.state_dict() if keeps_episodes else None}  # fmt: skip


def continue_episodes(env: Any, saved: dict[str, Any] | None, seed: int, env_step: int, returns: EpisodeReturns,
                      *rows: UpdateMetrics) -> TensorDict:  # fmt: skip
    """The training envs' observations to go on from at `env_step`, after `in_progress` state `saved` (None for a
    new run) went back into `returns` and `rows`: the running episodes it saved, or else new ones
    (`start_episodes`)."""
    for row, state in zip(rows, [] if saved is None else saved["rows"], strict=saved is not None):
        row.load_state_dict(state)
    if saved is None or saved["env"] is None or not saves_episodes(env):
        return returns.restart(env, seed, env_step)
    returns.load_state_dict(saved["returns"])
    return env.restore_episodes(saved["env"])


@torch.no_grad()
def episode_returns(
    agent: Agent, env: EnvBase, seed: int, frames: list[np.ndarray] | None = None,
    frame_size: tuple[int, int, int] = (240, 320, 0), solved: list[Tensor] | None = None,
) -> Tensor:  # fmt: skip
    """The return of one deterministic episode per eval env (DESIGN §5: 10), on the env's device. An env whose
    rows belong to several tasks (`task_ids`, a policy library's multi-task env) hands each row's task to the
    agent's `act`. With a `frames` list, the env's `render_frame` of env 0 ((height, width, camera) of
    `frame_size`) is appended after the reset and after every step of env 0's episode (a video of it). With a
    `solved` list and an env that reports ``success`` (Meta-World), whether each episode succeeded in any of its
    steps is appended."""
    env.set_seed(seed)
    td = env.reset()
    task_ids = getattr(env, "task_ids", None)
    task = {} if task_ids is None else {"task": task_ids}
    returns = torch.zeros(env.batch_size, device=env.device)  # on the env's device: Isaac Lab's rewards are CUDA
    running = torch.ones(env.batch_size, dtype=torch.bool, device=env.device)
    success = None  # per env: solved in some step (envs that report success)
    if frames is not None:
        frames.append(env.render_frame(0, *frame_size))
    while bool(running.any()):
        td.set("action", agent.act(td["observation"], deterministic=True, **task).to(env.device))
        td, next_td = env.step_and_maybe_reset(td)
        # squeeze / logical_not rather than [:, 0] / ~: the same, and ops that PyTorch's fake tensors run on a
        # claimed cuda device, so tests/test_devices.py can check that nothing here lives on the host
        returns += td["next", "reward"].squeeze(-1) * running
        if "success" in td["next"].keys():
            success = td["next", "success"].squeeze(-1) & running | (success if success is not None else False)
        if frames is not None and bool(running[0]):
            frames.append(env.render_frame(0, *frame_size))
        running &= td["next", "done"].squeeze(-1).logical_not()
        td = next_td
    if solved is not None and success is not None:
        solved.append(success)
    return returns


def evaluate(agent: Agent, env: EnvBase, seed: int) -> tuple[float, float]:
    """One deterministic episode per eval env; mean and std of the returns."""
    returns = episode_returns(agent, env, seed)
    return returns.mean().item(), returns.std(correction=0).item()


class UpdateMetrics:
    """Running sums of the agents' update metrics between log rows; the non-finite guard for losses and Q."""

    def __init__(self) -> None:
        self.keys: list[str] = []
        self.total: Tensor | None = None
        self.count = 0

    def add(self, updates: list[dict[str, Tensor]], env_step: int, num_updates: int) -> None:
        self.keys = list(updates[0])
        ref = updates[0][self.keys[0]]
        values = torch.stack([torch.stack([m[k].to(ref.device, torch.float32) for k in self.keys]) for m in updates])
        if not bool(torch.isfinite(values).all()):  # one host sync per agent step
            u, k = (~torch.isfinite(values)).nonzero()[0].tolist()
            update = num_updates - len(updates) + u + 1
            raise NonFiniteError(f"non-finite {self.keys[k]} ({values[u, k].item()}) at env_step {env_step} (update {update})")
        step_total = values.sum(0)
        self.total = step_total if self.total is None else self.total + step_total
        self.count += len(updates)

    def pop_means(self) -> dict[str, float]:
        if self.total is None:
            return {}
        means = dict(zip(self.keys, (self.total / self.count).tolist(), strict=True))
        self.total, self.count = None, 0
        return means

    def state_dict(self) -> dict[str, Any]:
        """The sums so far (a checkpoint between rows keeps them: the resumed row averages the same updates)."""
        return {"keys": list(self.keys), "total": None if self.total is None else self.total.clone(), "count": self.count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.keys, self.count = list(state["keys"]), int(state["count"])
        self.total = None if state["total"] is None else state["total"].clone()


def checkpoint_state(
    cfg: dict[str, Any],
    overrides: Sequence[str],
    counters: Counters,
    agent: Agent,
    replay: ReplayBuffer | NStepReplayBuffer | None,
    generator: torch.Generator,
    env_facts: dict[str, Any] | None = None,
    extra_meta: dict[str, Any] | None = None,
    progress: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Everything an exact resume needs, as plain containers and tensors (docs/training.md, "Checkpoints");
    `env_facts` (`export.env_deploy_facts` of the training env) lets export run without rebuilding the env;
    `extra_meta` is what else a loop records (GRPO: its source run's config); `progress` the work in progress
    (`in_progress`)."""
    agent_state = agent.state_dict()
    bad = find_nonfinite(agent_state)
    if bad is not None:
        raise NonFiniteError(f"non-finite agent state {bad} at env_step {counters.env_step}")
    meta = {"config": cfg, "overrides": list(overrides), "counters": dataclasses.asdict(counters)}
    if env_facts is not None:
        meta["env"] = env_facts
    meta.update(extra_meta or {})
    return {
        "meta": meta,
        "agent": agent_state,
        "replay": None if replay is None else replay.state_dict(),
        "rng": capture_rng(generator),
        "in_progress": progress,
    }


@dataclasses.dataclass
class StopGuard:
    """What a training loop's stop messages need: the loop sets `checkpoint_step` after each checkpoint it writes;
    `write_nonfinite` is False on the ranks that do not write files (DDP)."""

    run_dir: Path
    resolved: dict[str, Any]
    counters: Counters
    agent: Any
    progress: Any  # Progress, or a silent stand-in
    checkpoint_step: int
    write_nonfinite: bool = True


@contextlib.contextmanager
def reported_stops(guard: StopGuard) -> Iterator[StopGuard]:
    """Around a training loop (both algorithms): a non-finite stop writes the offending agent to
    checkpoints/nonfinite.pt and names the last finite checkpoint; Ctrl-C says how to resume; a finished loop
    prints its last line."""
    ckpt_dir, counters = guard.run_dir / CHECKPOINT_DIR, guard.counters
    try:
        yield guard
    except NonFiniteError as err:
        nonfinite = ckpt_dir / "nonfinite.pt"
        if guard.write_nonfinite:
            save_checkpoint(nonfinite, {"meta": {"config": guard.resolved, "counters": dataclasses.asdict(counters)},
                                        "agent": guard.agent.state_dict()})  # fmt: skip
        raise NonFiniteError(
            f"{err}: run stopped; last finite checkpoint {ckpt_dir / LATEST} (env_step {guard.checkpoint_step}), "
            f"the non-finite agent in {nonfinite}"
        ) from None
    except KeyboardInterrupt:
        raise KeyboardInterrupt(
            f"interrupted at env_step {counters.env_step}; resume=`{guard.run_dir}` continues from env_step "
            f"{guard.checkpoint_step}"
        ) from None
    final = f" | last eval return {counters.last_eval_return:.1f}" if counters.last_eval_return is not None else ""
    guard.progress.write(f"done: env_step {counters.env_step}{final} | run dir {guard.run_dir}")


# ------------------------------------------------------------------------------------------ resume, run dir


def load_resume(cfg: DictConfig, resolved: dict[str, Any]) -> dict[str, Any] | None:
    """The checkpoint `cfg.resume` names (None for a new run), after checking that the run it continues had the
    same config (`fasttd3_lora.config.RESUME_MAY_CHANGE` lists what may differ)."""
    if not cfg.resume:
        return None
    resume = load_checkpoint(resolve_checkpoint(cfg.resume))
    resume["meta"] = upgrade_saved(resume["meta"])
    check_resume_compatible(resolved, resume["meta"]["config"])
    return resume


def restore(
    resume: dict[str, Any],
    agent: Agent,
    replay: ReplayBuffer | NStepReplayBuffer | None,
    generator: torch.Generator,
    learning_starts: int,
) -> tuple[Counters, int]:
    """Load a checkpoint into the agent and, where the loop can use them (`replay` not None), the replay buffer
    and the generator; returns the counters and the agent step after which updates resume: at once when the
    buffer came back, else after refilling `learning_starts` agent steps."""
    counters = Counters(**resume["meta"]["counters"])
    agent.load_state_dict(resume["agent"])
    updates_from = learning_starts
    if replay is not None:
        restore_rng(resume["rng"], generator)
    if replay is not None and resume["replay"] is not None:
        replay.load_state_dict(resume["replay"])
    else:
        updates_from = counters.agent_step + learning_starts
    return counters, updates_from


def restore_on_policy(resume: dict[str, Any], agent: Any, generator: torch.Generator) -> Counters:
    """Load a checkpoint of an on-policy run (no replay: it checkpoints between rollouts) into the agent and the
    generator; returns the counters."""
    agent.load_state_dict(resume["agent"])
    restore_rng(resume["rng"], generator)
    return Counters(**resume["meta"]["counters"])


class _Silent:
    """Stands in for the logger and the progress display of a process that does not write (DDP ranks > 0)."""

    def log(self, *args: Any, **kwargs: Any) -> None: ...
    def update(self, *args: Any, **kwargs: Any) -> None: ...
    def write(self, *args: Any, **kwargs: Any) -> None: ...
    def close(self) -> None: ...


class RunRecord:
    """What a loop writes into its run directory: config.yaml, metric rows (metrics.csv, TensorBoard, wandb), the
    progress display (its ETA from `learning_from`, the env step where updates start), the run's wall time over
    all resumes, and checkpoints. `lead=False` (DDP ranks > 0) writes
    nothing and shows nothing, but builds the same checkpoint states (so every rank continues from them)."""

    def __init__(
        self,
        stack: ExitStack,
        cfg: DictConfig,
        resolved: dict[str, Any],
        run_dir: str | Path,
        overrides: Sequence[str],
        counters: Counters,
        *,
        resumed: bool,
        learning_from: int = 0,
        lead: bool = True,
    ) -> None:
        self.run_dir, self.resolved, self.overrides, self.cfg = Path(run_dir), resolved, list(overrides), cfg
        self._evaluations = 0  # of this process (videos every `video.every` of them)
        self.ckpt_dir = self.run_dir / CHECKPOINT_DIR
        self.counters, self.lead, self.resumed = counters, lead, resumed
        self.logger: RunLogger | _Silent = _Silent()
        self.progress: Progress | _Silent = _Silent()
        if lead:
            atomic_write(self.run_dir / "config.yaml", lambda f: f.write(OmegaConf.to_yaml(resolved).encode()))
            wandb = OmegaConf.to_container(cfg.wandb) if cfg.logger == "wandb" else None
            self.logger = RunLogger(self.run_dir, config=resolved, wandb=wandb,
                                    resumed_at=counters.env_step if resumed else None)  # fmt: skip
            self.progress = Progress(cfg.total_env_steps, counters.env_step, learning_from=learning_from)
        stack.callback(self.logger.close)
        stack.callback(self.progress.close)
        self.progress.update(counters.env_step, eval_return=counters.last_eval_return)
        self._start, self._start_wall = time.monotonic(), counters.wall_time
        self._guard: StopGuard | None = None
        self.extra_meta: dict[str, Any] = {}  # recorded in every checkpoint's meta (`checkpoint_state`)

    def announce(self, what: str) -> None:
        """The run's first line: `started: <what>` or `resumed at env_step N: <what>`."""
        how = f"resumed at env_step {self.counters.env_step}" if self.resumed else "started"
        self.progress.write(f"{how}: {what}, run dir {self.run_dir}")

    def wall_time(self) -> float:
        """Seconds of training so far, over all resumes."""
        return self._start_wall + time.monotonic() - self._start

    def log(self, row: dict[str, float]) -> None:
        self.logger.log(self.counters.env_step, self.wall_time(), row)

    def log_eval(self, mean: float, std: float) -> None:
        self.counters.last_eval_return = mean
        self.log({"eval_return": mean, "eval_return_std": std})
        self.progress.update(self.counters.env_step, eval_return=mean)

    def evaluate(self, agent: Agent, env: EnvBase, seed: int) -> Tensor:
        """`episode_returns`, logged (`log_eval`), with a video of the first episode every `video.every`
        evaluations (`<run dir>/videos/eval_<env_step>.mp4`, TensorBoard, wandb); returns the returns."""
        video = self.cfg.get("video", {}) if self.lead else {}
        self._evaluations += 1
        frames = [] if video.get("every", 0) and self._evaluations % video["every"] == 0 else None
        solved: list[Tensor] = []
        returns = episode_returns(agent, env, seed, frames, (video.get("height", 240), video.get("width", 320),
                                                             video.get("camera", 0)), solved)  # fmt: skip
        self.log_eval(returns.mean().item(), returns.std(correction=0).item())
        if solved:  # the env says when a task is solved (Meta-World): the success rate of the episodes
            self.log({"eval_success": solved[0].float().mean().item()})
        if frames:
            step = self.counters.env_step
            try:
                self.logger.log_video(step, "eval_video", frames, 1.0 / env.control_period,
                                      self.run_dir / "videos" / f"eval_{step}.mp4")  # fmt: skip
            except VideoError as err:  # a video is not worth the run: say so once and stop making them
                self.progress.write(f"{err}; no more videos in this run")
                self.cfg.video.every = 0
        return returns

    def checkpoint(
        self,
        agent: Agent,
        replay: ReplayBuffer | NStepReplayBuffer | None,
        generator: torch.Generator,
        env_facts: dict[str, Any] | None,
        *,
        keep_copy: bool = False,
        progress: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Write checkpoints/latest.pt (lead only; also `step_<env_step>.pt` with `keep_copy`); returns the state.
        `progress`: the work in progress (`in_progress`)."""
        self.counters.wall_time = self.wall_time()
        state = checkpoint_state(self.resolved, self.overrides, self.counters, agent, replay, generator, env_facts,
                                 self.extra_meta, progress)  # fmt: skip
        if self.lead:
            save_checkpoint(self.ckpt_dir / LATEST, state)
            if keep_copy:
                copy_checkpoint(self.ckpt_dir / LATEST, self.ckpt_dir / f"step_{self.counters.env_step}.pt")
        if self._guard is not None:
            self._guard.checkpoint_step = self.counters.env_step
        return state

    def guard(self, agent: Agent) -> StopGuard:
        """The stop guard of this run (`reported_stops`); `checkpoint` keeps its last checkpoint step current."""
        self._guard = StopGuard(self.run_dir, self.resolved, self.counters, agent, self.progress,
                                self.counters.env_step, write_nonfinite=self.lead)  # fmt: skip
        return self._guard
