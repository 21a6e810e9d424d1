"""Sweep presets (configs/experiment/, configs/hydra/launcher/) and the budget-matched ranks (issue 7)."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser

from fasttd3_lora.checkpoint import save_checkpoint
from fasttd3_lora.config import compose_config, config_dir, group_options
from fasttd3_lora.networks import make_critic
from fasttd3_lora.param_counts import lora_critic_trainable, matched_lora_rank, sparse_critic_trainable
from fasttd3_lora.train import prepare_command_line

# Jobs per preset: the product of its sweep axes (seeds x tasks x critics x scales x ablated values).
EXPECTED_JOBS = {
    "dmc_hard": 7 * 3 * 2 * 5,
    "isaaclab": 6 * 3 * 2 * 5,
    "dmc_cpu_small": 2 * 3 * 2,
    "ablation_warmup": 2 * 5 * 3,
    "ablation_base_rank": 2 * 5 * 3,
    "ablation_base_init_scale": 2 * 5 * 4,
    "ablation_nown": 2 * 5,
    "ablation_nobase": 2 * 5,
    "ablation_sparsity": 2 * 5 * 4,
    "ablation_rank_budget": 2 * 5 * 4,
    "cpu_demo": 1,  # make train: one run, no sweep
    "library_walker": 3 * 3,  # seeds x ranks, 8 tasks per run
    "library_walker_single": 3 * 8,
    "library_walker_scratch": 3 * 8,
    "drift": 3 * 6,  # seeds x ranks (full included)
    "lorasa_halfcheetah": 5 * 2,  # seeds x (PS, NPS)
    "lorasa_halfcheetah_phase2": 5,  # LoRASA from each seed's PS run
}
# What a preset needs from the command line (docs/library.md, docs/drift.md): a base run, a run to fine-tune.
REQUIRED = {"library_walker": ["library.base=/runs/base"], "library_walker_single": ["library.base=/runs/base"],
            "drift": ["grpo.from={source}"]}  # fmt: skip


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """A checkpoint as a PPO run writes it, as far as composing a GRPO config reads one."""
    path = tmp_path_factory.mktemp("source") / "latest.pt"
    save_checkpoint(path, {"meta": {"config": {"algo": {"name": "ppo", "action_repeat": 2}}}})
    return path


def jobs(experiment: str, command_line: tuple[str, ...] = ()) -> list[list[str]]:
    """The job overrides Hydra's basic sweeper makes for `-m experiment=<experiment> <command_line>`: the
    preset's hydra.sweeper.params first, then the command line (BasicSweeper.sweep does exactly this)."""
    cfg = compose_config([f"experiment={experiment}"], with_hydra=True, check=False)
    params = [f"{k}={v}" for k, v in (cfg.hydra.sweeper.get("params") or {}).items()]
    parsed = OverridesParser.create().parse_overrides([*params, *command_line])
    (batch,) = BasicSweeper.split_arguments(parsed, None)
    return batch


def test_every_preset_is_listed_here() -> None:
    assert set(group_options("experiment")) == set(EXPECTED_JOBS)


@pytest.mark.parametrize("experiment", sorted(EXPECTED_JOBS))
def test_presets_compose_and_expand_to_their_grid(experiment: str, source: Path) -> None:
    batch = jobs(experiment) or [[]]
    assert len(batch) == EXPECTED_JOBS[experiment]
    assert len({tuple(sorted(job)) for job in batch}) == len(batch)  # no job twice
    # Jobs compose and validate: one job per value of each axis (the product of valid values adds nothing).
    sample = list({job[axis]: job for job in batch for axis in range(len(job))}.values()) or [[]]
    required = [r.format(source=source) for r in REQUIRED.get(experiment, [])]
    for job in sample:
        cfg = compose_config([f"experiment={experiment}", *required, *job])
        assert cfg.seed in range(5)


def test_preset_values_reach_the_job_config() -> None:
    cfg = compose_config(["experiment=dmc_cpu_small", "task=dmc/ball_in_cup-catch", "critic=sparse"])
    assert (cfg.total_env_steps, cfg.algo.learning_starts, cfg.eval_every, cfg.eval_episodes, cfg.checkpoint_every) == (
        20_000, 1_000, 2_000, 5, 2_000)  # fmt: skip
    assert cfg.scale.critic_hidden_dim == 512 and cfg.critic.kind == "sparse"
    isaac = compose_config(["experiment=isaaclab", "task=Isaac-Velocity-Flat-G1-v0", "critic=lora"])
    assert isaac.algo.name == "fasttd3" and isaac.device == "cuda"
    assert compose_config(["experiment=dmc_hard", "task=dmc/dog-run"]).algo.name == "sac"


def test_lorasa_phase_two_starts_from_phase_ones_shared_run_of_its_seed_at_the_half() -> None:
    """Phase 1 keeps the checkpoint at 6M (an evaluation and a checkpoint step) where phase 2 looks for it."""
    first = compose_config(["experiment=lorasa_halfcheetah", "policy=shared", "seed=3"], with_hydra=True)
    second = compose_config(["experiment=lorasa_halfcheetah_phase2", "seed=3"], with_hydra=True)
    half = second.total_env_steps
    assert first.total_env_steps == 2 * half and first.keep_eval_checkpoints and first.algo.recurrent
    assert half % first.eval_every == 0 and half % first.checkpoint_every == 0
    source = Path(first.hydra.sweep.dir) / first.hydra.sweep.subdir / "checkpoints" / f"step_{half}.pt"
    assert second.policy["from"] == str(source) and second.algo.recurrent and second.policy.mode == "lorasa"


def test_command_line_replaces_a_sweep_axis() -> None:
    cell = jobs("dmc_hard", ("task=dmc/dog-run", "critic=lora", "scale=large", "seed=3"))
    assert cell == [["seed=3", "task=dmc/dog-run", "critic=lora", "scale=large"]]
    one_seed = jobs("dmc_hard", ("seed=3",))
    assert len(one_seed) == 42 and {job[0] for job in one_seed} == {"seed=3"}
    two_tasks = jobs("dmc_hard", ("task=dmc/dog-run,dmc/humanoid-run",))
    assert len(two_tasks) == 2 * 3 * 2 * 5
    # A key spelled differently (+seed, ++seed) is a different key to the sweeper: both would apply.
    assert len(jobs("dmc_cpu_small", ("++total_env_steps=100",))) == 12


def test_ablations_sweep_only_their_own_key_over_the_shared_base() -> None:
    base = compose_config(["experiment=ablation_nown"], with_hydra=True).hydra.sweeper.params
    assert dict(base) == {"seed": "0,1,2,3,4", "task": "dmc/dog-run,dmc/humanoid-run", "critic": "lora",
                          "scale": "base", "critic.project": "false"}  # fmt: skip
    cfg = compose_config(["experiment=ablation_nown", "critic.project=false"])
    assert cfg.critic.project is False and cfg.total_env_steps == 1_000_000


def test_launcher_presets_compose_with_their_overrides() -> None:
    slurm = compose_config(
        ["hydra/launcher=slurm", "hydra.launcher.gpus_per_node=4", "hydra.launcher.cpus_per_task=16",
         "hydra.launcher.timeout_min=60", "hydra.launcher.partition=gpu", "hydra.launcher.mem_gb=32"],
        check=False, with_hydra=True,
    ).hydra.launcher  # fmt: skip
    assert slurm._target_.endswith("SlurmLauncher")
    assert (slurm.gpus_per_node, slurm.cpus_per_task, slurm.timeout_min, slurm.partition, slurm.mem_gb) == (4, 16, 60, "gpu", 32)
    assert slurm.max_num_timeout == 0
    defaults = compose_config(["hydra/launcher=slurm"], check=False, with_hydra=True).hydra.launcher
    assert (defaults.gpus_per_node, defaults.partition) == (1, None)
    local = compose_config(["hydra/launcher=local_parallel", "hydra.launcher.n_jobs=3"], check=False, with_hydra=True)
    assert local.hydra.launcher._target_.endswith("JoblibLauncher") and local.hydra.launcher.n_jobs == 3
    # The sweep directory is still the app's (prepare_command_line gives each multirun a fresh one).
    assert local.hydra.sweep.dir.startswith("runs/")


def test_documented_launcher_command_line_passes_the_app_check() -> None:
    """docs/experiments.md's parallel command: the launcher group is selected before its keys are checked."""
    argv = ["-m", "experiment=dmc_cpu_small", "hydra/launcher=local_parallel", "hydra.launcher.n_jobs=2"]
    prepared = prepare_command_line(argv)
    assert prepared[: len(argv)] == argv and prepared[-1].startswith("hydra.sweep.dir=")


# ------------------------------------------------------------------------------------- budget-matched ranks


def test_sparse_count_is_the_expected_nonzeros_of_a_built_sparse_critic() -> None:
    torch.manual_seed(0)
    in_dim, hidden, blocks, atoms, sparsity = 23, 64, 2, 11, 0.7
    critic = make_critic("sparse", 20, 3, hidden, blocks, atoms, -1.0, 1.0, sparsity=sparsity)
    nonzero = sum(int((p != 0).sum()) for p in critic.parameters())
    expected = sparse_critic_trainable(in_dim, hidden, blocks, atoms, sparsity)
    weights = sum(p.numel() for p in critic.parameters() if p.dim() >= 2)
    # Bernoulli masks: the count is a sum of independent draws, within a few std of its mean.
    assert abs(nonzero - expected) < 5 * math.sqrt(weights * 0.25)
    assert expected < 0.5 * sum(p.numel() for p in critic.parameters())


@settings(max_examples=60, deadline=None)
@given(
    in_dim=st.integers(2, 300),
    hidden=st.sampled_from([32, 128, 512, 1024]),
    blocks=st.integers(1, 4),
    sparsity=st.floats(0.3, 0.95),
)
def test_matched_rank_is_the_nearest_budget(in_dim: int, hidden: int, blocks: int, sparsity: float) -> None:
    atoms = 101
    target = sparse_critic_trainable(in_dim, hidden, blocks, atoms, sparsity)
    rank = matched_lora_rank(in_dim, hidden, blocks, atoms, sparsity)
    if rank is None:  # even r = 1 is further above the budget than half a rank's parameters
        assert lora_critic_trainable(in_dim, hidden, blocks, atoms, 1) - target > 0.5 * 10 * blocks * hidden
        return
    gap = abs(lora_critic_trainable(in_dim, hidden, blocks, atoms, rank) - target)
    for other in (rank - 1, rank + 1):
        if 1 <= other <= hidden:
            assert gap <= abs(lora_critic_trainable(in_dim, hidden, blocks, atoms, other) - target)


def test_default_rank_matches_sparse_at_the_default_sparsity() -> None:
    """The paper's r = 96 has Sparse's budget at the scales' default S (0.7 base, 0.85 large): humanoid-run."""
    assert abs(matched_lora_rank(88, 512, 2, 101, 0.7) - 96) <= 2
    assert abs(matched_lora_rank(88, 1024, 4, 101, 0.85) - 96) <= 2


def test_committed_rank_budget_preset_is_what_the_script_derives() -> None:
    spec = importlib.util.spec_from_file_location("rank_budget", config_dir().parent / "scripts" / "rank_budget.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    text, table = module.preset_text()
    assert (config_dir() / "experiment" / "ablation_rank_budget.yaml").read_text() == text
    # Every swept rank is within 6% of Sparse's trainable parameters on every task of the ablation.
    gaps = [float(line.split(" | ")[-1].rstrip(" |%")) for line in table[3:]]
    assert len(gaps) == 5 and max(gaps) <= 6.0
