"""The MAPPO loop (`python -m fasttd3_lora.train algo=mappo task=vmas/het_mass policy=shared|separate|lorasa`;
DESIGN §10, docs/mappo.md):

    every iteration           a rollout of num_steps steps of all envs' agents, GAE per agent (time-outs bootstrap
                              from the value of the true final observations), then epochs x minibatches updates;
                              the finished episodes' team returns (the agents' mean) and the update's means are one
                              metrics row
    every eval_every          deterministic episodes on separate envs (Isaac Lab: on the training env, after which
                              the training episodes restart): their team return
    every checkpoint_every    checkpoints/latest.pt at the end of the iteration, then every training episode
                              restarts (exact resume, `fasttd3_lora.loops.kit`)

`policy=lorasa policy.from=RUN_DIR` starts from a phase-1 `policy=shared` run: its actor (frozen, with per-agent
adapters), critic, and observation, state and value statistics.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from fasttd3_lora.checkpoint import CheckpointError, load_checkpoint, resolve_checkpoint
from fasttd3_lora.checks import ConfigError
from fasttd3_lora.envs import EnvRequest, env_deploy_facts, make_envs
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
)
from fasttd3_lora.mappo import MAPPO, MAPPOConfig, adapt_lorasa, make_actor, policy_from_state_dict
from fasttd3_lora.mlp_policy import ValueFunction
from fasttd3_lora.normalization import RunningMeanStd
from fasttd3_lora.ppo import gae
from fasttd3_lora.recurrent import reset_hidden

__all__ = ["build", "team_returns", "run"]


def build(cfg: MAPPOConfig, env: Any, device: torch.device, generator: torch.Generator) -> MAPPO:
    """The agent for `env`: fresh networks, or (lorasa) phase 1's, with per-agent adapters on its actor."""
    mask = torch.zeros(env.num_agents, env.act_dim)
    for i, dims in enumerate(env.act_dims):
        mask[i, :dims] = 1.0
    critic = ValueFunction(env.state_dim, cfg.critic_hidden_dims, num_tasks=env.num_agents)
    statistics = (RunningMeanStd(env.obs_dim), RunningMeanStd(env.state_dim))
    if cfg.policy_mode != "lorasa":
        actor = make_actor(cfg.policy_mode, env.obs_dim, env.act_dim, cfg.actor_hidden_dims, env.num_agents, cfg.init_std,
                           cfg.rnn_hidden_dim if cfg.recurrent else None, cfg.rnn_after_dims)  # fmt: skip
        return MAPPO(cfg, actor, critic, *statistics, mask, device, generator)
    try:
        path = resolve_checkpoint(cfg.policy_from, key="policy.from")
    except CheckpointError as err:
        raise ConfigError(str(err)) from None
    try:
        state = load_checkpoint(path)
    except CheckpointError as err:
        raise ConfigError(f"policy.from={cfg.policy_from}: {err}") from None
    saved = state["meta"]["config"]
    if saved.get("algo", {}).get("name") != "mappo" or saved.get("policy", {}).get("mode") != "shared":
        raise ConfigError(f"policy.from={cfg.policy_from}: LoRASA's phase 2 starts from a policy=shared MAPPO run; "
                          f"this is algo={saved.get('algo', {}).get('name')}, policy={saved.get('policy', {}).get('mode')}")  # fmt: skip
    if saved.get("algo", {}).get("recurrent", False) != cfg.recurrent:
        raise ConfigError(f"policy.from={cfg.policy_from}: its actor has algo.recurrent="
                          f"{saved.get('algo', {}).get('recurrent', False)}, this run asks for {cfg.recurrent}")  # fmt: skip
    phase1 = MAPPO(saved_config(cfg), policy_from_state_dict(state["agent"]["actor"]), critic, *statistics,
                   mask, device, generator)  # fmt: skip
    try:
        phase1.load_state_dict({**state["agent"], "optimizer": phase1.optimizer.state_dict()})
    except (RuntimeError, KeyError) as err:
        raise ConfigError(f"policy.from={cfg.policy_from}: its networks do not fit this task "
                          f"({str(err).splitlines()[0][:160]})") from None  # fmt: skip
    actor = phase1.actor
    adapt_lorasa(actor, cfg.policy_rank, cfg.policy_alpha)
    agent = MAPPO(cfg, actor, phase1.critic, phase1.obs_rms, phase1.state_rms, mask, device, generator)
    agent.value_rms.load_state_dict(phase1.value_rms.state_dict())
    return agent


def saved_config(cfg: MAPPOConfig) -> MAPPOConfig:
    """The config phase 1's networks are read with (its mode: shared)."""
    return dataclasses.replace(cfg, policy_mode="shared", policy_from=None)


@torch.no_grad()
def team_returns(agent: MAPPO, env: Any, seed: int) -> Tensor:
    """One deterministic episode per eval env; each env's team return (the mean over agents of their returns)."""
    env.set_seed(seed)
    obs = env.reset().obs
    returns = torch.zeros(env.num_envs, device=env.device)  # on the env's device: Isaac Lab's rewards are CUDA
    running = torch.ones(env.num_envs, dtype=torch.bool, device=env.device)
    hidden = agent.initial_hidden(env.num_envs)
    while bool(running.any()):
        actions, hidden = agent.act(obs, hidden, deterministic=True)
        out = env.step(actions)
        returns += out.reward.mean(-1) * running
        running &= ~(out.terminated | out.truncated)
        obs = out.obs  # an env that ended starts again (its return no longer counts): so does its hidden state
        hidden = None if hidden is None else reset_hidden(hidden, ~running.to(hidden.device))
    return returns


def run(cfg: DictConfig, mcfg: MAPPOConfig, run_dir: str | Path, overrides: Sequence[str] = ()) -> Counters:
    """Run (or, with `cfg.resume`, continue) one MAPPO run writing into `run_dir` (see the module docstring)."""
    resolved = OmegaConf.to_container(cfg, resolve=True)
    device = torch.device(cfg.device)
    num_envs, num_steps = mcfg.num_envs, mcfg.num_steps
    env_steps_per_iteration = num_envs * num_steps * mcfg.action_repeat
    resume = load_resume(cfg, resolved)

    seed_everything(cfg.seed)
    generator = torch.Generator(device).manual_seed(cfg.seed)
    with ExitStack() as stack:
        env, eval_env = make_envs(EnvRequest.of_run(cfg, num_envs, mcfg.action_repeat, cfg.seed, cfg.device))
        stack.callback(env.close)
        shares_env = eval_env is env  # Isaac Lab: one env per process
        if not shares_env:
            stack.callback(eval_env.close)
        agent = build(mcfg, env, device, generator)
        counters = Counters() if resume is None else restore_on_policy(resume, agent, generator)
        record = RunRecord(stack, cfg, resolved, run_dir, overrides, counters, resumed=resume is not None)
        del resume
        trained = sum(p.numel() for p in agent.actor.parameters() if p.requires_grad)
        record.announce(f"{cfg.task.name}, mappo, policy={mcfg.policy_mode} ({trained:,} trainable actor numbers for "
                        f"{env.num_agents} agents), {num_envs} envs")  # fmt: skip
        facts = env_deploy_facts(env)

        def checkpoint(keep_copy: bool = False) -> None:
            record.checkpoint(agent, None, generator, facts, keep_copy=keep_copy)

        if counters.env_step == 0:
            checkpoint()
        env.set_seed(episode_seed(cfg.seed, counters.env_step, stream=0))
        obs, state = env.reset()
        hidden, first = agent.initial_hidden(num_envs), torch.ones(num_envs, dtype=torch.bool)  # recurrent actors
        team_return = torch.zeros(num_envs, device=env.device)
        metrics = UpdateMetrics()
        row_step, row_time = counters.env_step, time.monotonic()
        with reported_stops(record.guard(agent)):
            while counters.env_step < cfg.total_env_steps:
                steps, finished = [], []
                for _ in range(num_steps):
                    out = agent.explore(obs, state, hidden, first)
                    result = env.step(out["action"].clamp(-1.0, 1.0))
                    done = result.terminated | result.truncated
                    hidden, first = out.pop("next_hidden", None), done
                    out["reward"], out["terminated"], out["done"] = result.reward, result.terminated, done
                    out["next_state"] = result.final_state
                    steps.append(out)
                    team_return += result.reward.mean(-1)
                    if bool(done.any()):
                        finished.append(team_return[done].clone())
                    team_return[done] = 0.0
                    obs, state = result.obs, result.state
                end, evaluation, checkpoint_due = advance(counters, env_steps_per_iteration, cfg)
                # Episodes restart after a checkpoint (exact resume), and on Isaac Lab after an evaluation.
                restart = (checkpoint_due or (evaluation and shares_env)) and not end

                rollout = torch.stack(steps)  # (T, N)
                if restart:  # a time-out for every episode: it bootstraps
                    rollout["done"][-1] = True
                t, n, m = num_steps, num_envs, env.num_agents
                next_values = agent.bootstrap_values(rollout["next_state"].flatten(0, 1)).view(t, n, m)
                per_agent = lambda x: x.unsqueeze(-1).expand(t, n, m)  # noqa: E731
                advantages, returns = gae(rollout["reward"].flatten(1), rollout["value"].flatten(1),
                                          next_values.flatten(1), per_agent(rollout["terminated"]).flatten(1),
                                          per_agent(rollout["done"]).flatten(1), mcfg.gamma, mcfg.gae_lambda)  # fmt: skip
                rollout["advantage"], rollout["return"] = advantages.view(t, n, m), returns.view(t, n, m)
                metrics.add([agent.update(rollout.exclude("next_state", "reward", "terminated", "done"))], counters.env_step,
                            agent.num_updates)  # fmt: skip

                now = time.monotonic()
                row = {"sps": (counters.env_step - row_step) / max(now - row_time, 1e-9), **metrics.pop_means()}
                row_step, row_time = counters.env_step, now
                if finished:
                    row["episode_return"] = torch.cat(finished).mean().item()
                record.log(row)

                paused = time.monotonic()
                if evaluation:
                    returns_eval = team_returns(agent, eval_env, episode_seed(cfg.seed, counters.env_step, stream=1))
                    record.log_eval(returns_eval.mean().item(), returns_eval.std(correction=0).item())
                if checkpoint_due:
                    checkpoint(keep_copy=evaluation and cfg.keep_eval_checkpoints)
                if restart:
                    env.set_seed(episode_seed(cfg.seed, counters.env_step, stream=0))
                    obs, state = env.reset()
                    first = torch.ones(num_envs, dtype=torch.bool)
                    team_return.zero_()
                row_time += time.monotonic() - paused
                record.progress.update(counters.env_step)
    return counters
