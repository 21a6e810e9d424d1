"""The GRPO loop (`python -m fasttd3_lora.train algo=grpo grpo.from=RUN_DIR grpo.rank=4 task=...`; DESIGN §10,
docs/drift.md):

    before the first iteration  the source run's actor (and observation statistics) becomes the policy and its frozen
                                reference; the reference plays one episode on every training env and `drift_states`
                                of the states it visits are kept (the same ones on a resume: their own seed)
    every iteration             every env plays one whole episode from a start shared by its group (DMC: the same
                                seed for `group_size` consecutive envs); group-relative advantages of the returns;
                                num_epochs x num_minibatches clipped-ratio updates; then the drift: KL(pi_ref || pi)
                                on the kept states and ||Delta W||_F of every linear map, with the update's
                                wall-clock, in the iteration's metrics row
    every eval_every            deterministic episodes on separate envs
    every checkpoint_every      checkpoints/latest.pt (every iteration starts fresh episodes, so none is cut)

Run directory, metrics, checkpoints, exact resume and the non-finite guard come from the loop kit. Checkpoints also
record the source run's config (`meta.source`), from which export rebuilds the policy.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from tensordict import TensorDict
from torch import Tensor, nn

from fasttd3_lora.algorithms import algorithm
from fasttd3_lora.checkpoint import load_checkpoint, resolve_checkpoint
from fasttd3_lora.checks import ConfigError
from fasttd3_lora.envs import EnvRequest, env_deploy_facts, make_envs
from fasttd3_lora.grpo import GRPO, GaussianView, GRPOConfig, group_advantages
from fasttd3_lora.loops.kit import (
    Counters,
    RunRecord,
    UpdateMetrics,
    advance,
    episode_seed,
    load_resume,
    reported_stops,
    restore_on_policy,
    seed_everything,
    start_episodes,
)
from fasttd3_lora.normalization import RunningMeanStd

__all__ = ["load_source", "run"]

DRIFT_STREAM = 2  # the seed stream of the reference's episode (0: training, 1: evaluation; `episode_seed`)


def load_source(source: str, obs_dim: int, act_dim: int) -> tuple[nn.Module, RunningMeanStd, dict[str, Any]]:
    """The actor (weights loaded), observation statistics and checkpoint meta of the run `grpo.from` names, for an
    env of `obs_dim` / `act_dim` (refused in one line when the actor was trained on another)."""
    path = resolve_checkpoint(source)
    state = load_checkpoint(path)
    meta, agent = state["meta"], state["agent"]
    config = meta["config"]
    if config.get("library", {}).get("path") is not None:
        raise ConfigError(f"grpo.from={source}: a policy-library run (its policy carries adapters); fine-tune the "
                          "library's base run instead")  # fmt: skip
    source_obs = agent["obs_rms"]["mean"].shape[-1]
    source_act = (meta.get("env") or {}).get("action", {}).get("dim")
    if (source_obs, source_act) != (obs_dim, act_dim):
        raise ConfigError(f"grpo.from={source}: its actor takes {source_obs} observations and {source_act} actions "
                          f"({config['task']['name']}); this task has {obs_dim} and {act_dim}")  # fmt: skip
    actor = algorithm(config["algo"]["name"]).build_actor(meta, agent["actor"], obs_dim, act_dim)
    actor.load_state_dict(agent["actor"])
    rms = RunningMeanStd(obs_dim)
    rms.load_state_dict(agent["obs_rms"])
    return actor, rms, {"config": config, "env": meta.get("env"), "path": str(path.resolve())}


@torch.no_grad()
def reference_states(agent: GRPO, env: Any, seed: int, count: int) -> Tensor:
    """`count` normalised states from one episode of the reference (the policy before any update) on every env."""
    obs = start_episodes(env, seed, 0)["observation"]
    visited = []
    running = torch.ones(env.batch_size, dtype=torch.bool)
    while bool(running.any()):
        visited.append(agent.normalize(obs[running.to(obs.device)]))
        td = TensorDict({"observation": obs, "action": agent.act(obs).to(env.device)}, batch_size=env.batch_size)
        td, next_td = env.step_and_maybe_reset(td)
        running &= td["next", "done"].squeeze(-1).logical_not().cpu()
        obs = next_td["observation"]
    states = torch.cat(visited)
    pick = torch.randperm(len(states), generator=torch.Generator().manual_seed(seed))[:count]
    return states[pick.to(states.device)]


def run(cfg: DictConfig, gcfg: GRPOConfig, run_dir: str | Path, overrides: Sequence[str] = ()) -> Counters:
    """Run (or, with `cfg.resume`, continue) one GRPO run writing into `run_dir` (see the module docstring)."""
    resolved = OmegaConf.to_container(cfg, resolve=True)
    device = torch.device(cfg.device)
    num_envs = gcfg.num_envs
    resume = load_resume(cfg, resolved)

    seed_everything(cfg.seed)
    generator = torch.Generator(device).manual_seed(cfg.seed)  # actions and minibatch order
    with ExitStack() as stack:
        env, eval_env = make_envs(EnvRequest.of_run(cfg, num_envs, gcfg.action_repeat, cfg.seed, cfg.device,
                                                    group_size=gcfg.group_size))  # fmt: skip
        stack.callback(env.close)
        stack.callback(eval_env.close)
        obs_dim, act_dim = env.observation_spec["observation"].shape[-1], env.action_spec.shape[-1]
        actor, obs_rms, source = load_source(gcfg.from_run, obs_dim, act_dim)
        agent = GRPO(gcfg, GaussianView(actor, gcfg.init_std), obs_rms, device, generator)
        drift_states = reference_states(agent, env, episode_seed(cfg.seed, 0, DRIFT_STREAM), gcfg.drift_states)
        env_facts = env_deploy_facts(env)
        counters = Counters() if resume is None else restore_on_policy(resume, agent, generator)
        record = RunRecord(stack, cfg, resolved, run_dir, overrides, counters, resumed=resume is not None)
        record.extra_meta = {"source": source}
        del resume
        trained = sum(p.numel() for p in agent.trainable_parameters())
        mode = "full fine-tuning" if gcfg.rank is None else f"rank-{gcfg.rank} adapters"
        record.announce(f"{cfg.task.name}, grpo from {source['config']['algo']['name']} run {source['path']} "
                        f"({mode}, {trained:,} trainable numbers, KL coefficient {gcfg.kl_coef}), {num_envs} envs in "
                        f"groups of {gcfg.group_size}")  # fmt: skip

        def checkpoint(keep_copy: bool = False) -> None:
            record.checkpoint(agent, None, generator, env_facts, keep_copy=keep_copy)

        if counters.env_step == 0:
            checkpoint()
        metrics = UpdateMetrics()
        row_step, row_time = counters.env_step, time.monotonic()
        with reported_stops(record.guard(agent)):
            while counters.env_step < cfg.total_env_steps:
                # 1. one episode on every env, groups from shared starts
                obs = start_episodes(env, cfg.seed, counters.env_step)["observation"]
                steps, alive = [], []
                running = torch.ones(num_envs, dtype=torch.bool, device=device)
                returns = torch.zeros(num_envs, device=device)
                while bool(running.any()):
                    out = agent.explore(obs)
                    td = TensorDict({"observation": obs, "action": agent.policy.to_action(out["u"]).to(env.device)},
                                    batch_size=[num_envs])  # fmt: skip
                    td, next_td = env.step_and_maybe_reset(td)
                    returns += td["next", "reward"].squeeze(-1).to(device) * running
                    steps.append(out)
                    alive.append(running.clone())
                    running &= td["next", "done"].squeeze(-1).to(device).logical_not()
                    obs = next_td["observation"]
                env_steps = int(torch.stack(alive).sum()) * gcfg.action_repeat
                end, evaluation, checkpoint_due = advance(counters, env_steps, cfg)

                # 2. group-relative advantages for every action of a rollout, then the update
                rollout = torch.stack(steps)  # (T, N)
                rollout["advantage"] = group_advantages(returns, gcfg.group_size).expand(len(steps), num_envs)
                batch = rollout[torch.stack(alive)]  # the steps before each episode's end
                started = time.perf_counter()
                update = agent.update(batch)
                update_s = time.perf_counter() - started
                metrics.add([update], counters.env_step, agent.num_updates)

                # 3. the drift, and one metrics row per iteration
                now = time.monotonic()
                row = {"episode_return": returns.mean().item(), "sps": (counters.env_step - row_step) / max(now - row_time, 1e-9),
                       "update_s": update_s, **metrics.pop_means(),
                       **{k: v.item() for k, v in agent.drift(drift_states).items()}}  # fmt: skip
                row_step, row_time = counters.env_step, now
                record.log(row)

                # 4. evaluate, checkpoint
                paused = time.monotonic()
                if evaluation:
                    record.evaluate(agent, eval_env, episode_seed(cfg.seed, counters.env_step, stream=1))
                if checkpoint_due:
                    checkpoint(keep_copy=evaluation and cfg.keep_eval_checkpoints)
                row_time += time.monotonic() - paused
                record.progress.update(counters.env_step)
    return counters
