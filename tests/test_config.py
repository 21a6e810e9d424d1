"""The Hydra config groups compose and validate; bad values and bad group choices fail in one line."""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_module
from hypothesis import given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf

from fasttd3_lora.algorithms import ALGORITHMS
from fasttd3_lora.envs import TASK_FAMILIES
from fasttd3_lora.config import (
    CONFIG_MODULE,
    ConfigError,
    check_overrides,
    check_resume_compatible,
    compose_config,
    config_dir,
    group_options,
    merge_overrides,
    path_safe,
    validate_config,
)

EXAMPLE = ["task=dmc/walker-walk", "critic=lora", "seed=1", "total_env_steps=200000"]


@pytest.fixture(scope="module")
def default_cfg():
    return compose_config([])


def test_documented_example_composes() -> None:
    cfg = compose_config(EXAMPLE)
    assert (cfg.task.name, cfg.critic.kind, cfg.seed, cfg.total_env_steps) == ("dmc/walker-walk", "lora", 1, 200000)
    assert cfg.algo.name == "sac" and cfg.scale.critic_hidden_dim == 512


def test_defaults_are_the_papers_sac_recipe(default_cfg) -> None:
    # DESIGN §5 and §3, read back from the composed default config (make train runs exactly this).
    algo = default_cfg.algo
    assert (algo.action_repeat, algo.updates_per_step, algo.batch_size, algo.buffer_size) == (2, 2, 256, 1_000_000)
    assert (algo.learning_starts, algo.lr_init, algo.lr_final, algo.tau) == (5000, 1e-4, 5e-5, 0.005)
    assert (algo.temperature_init, algo.target_entropy_per_action_dim, algo.discount) == (0.01, -0.5, None)
    assert (algo.num_atoms, algo.v_min, algo.v_max, algo.num_critics, algo.lora_weight_decay) == (101, -5, 5, 1, 2e-4)
    assert (default_cfg.critic.kind, default_cfg.critic.rank, default_cfg.critic.alpha) == ("lora", 96, 96)
    assert default_cfg.critic.base_init_scale == 0.5 and default_cfg.device == "cpu"
    assert default_cfg.task.name == "dmc/cheetah-run" and default_cfg.eval_episodes == 10


def test_every_group_option_composes_and_validates(default_cfg) -> None:
    groups = {g: group_options(g) for g in ("algo", "critic", "scale", "task")}
    assert groups["critic"] == ["lora", "simbav2", "sparse"] and groups["scale"] == ["base", "large", "small"]
    dmc = [o for o in groups["task"] if o.startswith("dmc/")]
    # Hydra composes one config in ~0.2 s: every option but the DMC tasks goes through Hydra, and two DMC tasks;
    # the other DMC task files (flat leaves, no defaults list) are merged onto the default config as Hydra would.
    hydra_options = [(g, o) for g, options in groups.items() for o in options if not o.startswith("dmc/")]
    with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
        for group, option in [*hydra_options, ("task", "dmc/walker-walk"), ("task", "dmc/ball_in_cup-catch")]:
            cfg = compose(config_name="config", overrides=[f"{group}={option}"])
            if group == "critic":
                assert cfg.critic.kind == option
            if (group, option) == ("algo", "grpo"):  # fine-tunes a run named on the command line
                with pytest.raises(ConfigError, match=r"^grpo.from=None: allowed a run directory"):
                    validate_config(cfg)
            elif cfg.algo.name in ALGORITHMS and cfg.task.family in ALGORITHMS[cfg.algo.name].families:
                validate_config(cfg)
            elif cfg.algo.name in ALGORITHMS and cfg.task.family in TASK_FAMILIES:  # e.g. the default SAC on VMAS
                *rest, last = ALGORITHMS[cfg.algo.name].families  # "dmc", "dmc and metaworld", "a, b and c"
                families = f"{', '.join(rest)} and {last}" if rest else last
                with pytest.raises(ConfigError, match=rf"^task.family='{cfg.task.family}': {cfg.algo.name} runs "
                                                      rf"{families} tasks only"):  # fmt: skip
                    validate_config(cfg)
                if group == "task":  # then with the first algorithm that runs the family
                    runs = next(name for name, a in ALGORITHMS.items() if cfg.task.family in a.families)
                    validate_config(compose(config_name="config", overrides=[f"algo={runs}", f"task={option}"]))
            else:  # an agent or env family the app cannot build yet is refused up front, by name
                with pytest.raises(ConfigError, match=r"^(algo\.name|task\.family)='\w+': allowed one of"):
                    validate_config(cfg)
    for option in dmc:
        leaf = OmegaConf.load(config_dir() / "task" / f"{option}.yaml")
        assert set(leaf) == {"defaults", "name", "max_episode_steps"} and leaf.name == option
        assert list(leaf.defaults) == ["_dmc", "_self_"]  # the family's settings, then the task's own
        del leaf["defaults"]
        validate_config(OmegaConf.merge(default_cfg, {"task": leaf}))


def test_dmc_task_configs_match_dm_control_suite_and_our_families(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MUJOCO_GL", "disabled")  # no GL probing (and no warning) on a machine without a display
    from dm_control import suite

    from fasttd3_lora.tasks.dmc_families import ALL_TASKS, EXTRA_TASKS

    assert set(suite.ALL_TASKS) <= set(ALL_TASKS) and len(EXTRA_TASKS) == 5 + 4 + 4
    expected = sorted(f"dmc/{domain}-{task}" for domain, task in ALL_TASKS)
    dmc = [o for o in group_options("task") if o.startswith("dmc/")]
    assert dmc == expected  # regenerate with scripts/make_dmc_task_configs.py


def test_run_dir_names_task_critic_and_seed() -> None:
    with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
        cfg = compose(config_name="config", overrides=EXAMPLE, return_hydra_config=True)
        run_dir = cfg.hydra.run.dir
        subdir = cfg.hydra.sweep.subdir if "num" in cfg.hydra.job else None
    assert run_dir.startswith("runs/") and run_dir.endswith("_dmc-walker-walk_lora_s1")
    assert subdir is None or subdir.endswith("_dmc-walker-walk_lora_s1")


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["critic=foo"], "critic=foo: unknown option (allowed: lora, simbav2, sparse)"),
        (["task=dmc/chetah-run"], "task=dmc/chetah-run: unknown option; did you mean dmc/cheetah-run"),
        (["task=_isaaclab"], "task=_isaaclab: unknown option"),  # shared pieces are not options
        (["scale=larg"], "scale=larg: unknown option; did you mean large?"),
        (["critic=lora,foo"], "critic=foo: unknown option"),  # a sweep's bad choice too
        (["total_env_step=5"], "total_env_step: no such config key; did you mean total_env_steps?"),
        (["task.name=dmc/foo"], "task.name=dmc/foo: unknown option"),
        (["critic.kind=dense"], "critic.kind='dense': allowed one of simbav2, sparse, lora"),
        (["critic.rank=513"], "critic.rank=513: allowed an integer in [1, 512]"),
        (["critic.rank=0"], "critic.rank=0: allowed an integer in [1, 512]"),
        (["scale=large", "critic.rank=1025"], "critic.rank=1025: allowed an integer in [1, 1024]"),
        (["critic.base_init_scale=1.0"], "critic.base_init_scale=1.0: allowed a number in (0.0, 1.0)"),
        (["total_env_steps=-5"], "total_env_steps=-5: allowed an integer >= 1"),
        (["algo.learning_starts=-1"], "algo.learning_starts=-1: allowed an integer >= 0"),
        (["algo.lr_init=-0.001"], "algo.lr_init=-0.001: allowed a number > 0.0"),
        (["algo.lr_final=0"], "algo.lr_final=0: allowed a number > 0.0"),
        (["algo.batch_size=512", "algo.buffer_size=300"], "algo.batch_size=512: allowed at most algo.buffer_size (300)"),
        (["algo.num_critics=3"], "algo.num_critics=3: allowed one of 1, 2"),
        (["algo.discount=1.0"], "algo.discount=1.0: allowed a number in [0.0, 1.0)"),
        (["algo.v_min=5"], "algo.v_max=5.0: allowed a number > algo.v_min (5.0)"),
        (["algo.name=td3"], "algo.name='td3': allowed one of sac"),
        (["seed=-1"], "seed=-1: allowed an integer in [0, 4294967295]"),
        (["device=gpu"], "device='gpu': allowed cpu, cuda, cuda:<index> or mps"),
        (["logger=tensorboard"], "logger='tensorboard': allowed one of none, wandb"),
        (["wandb.mode=shared"], "wandb.mode='shared': allowed one of offline, online, disabled"),
        (["save_buffer=maybe"], "save_buffer='maybe': allowed true or false"),
        (["task.spread_starts=maybe"], "task.spread_starts='maybe': allowed true or false"),
        (["task.spread_starts=true", "task.backend=envpool"], "task.spread_starts=true: allowed with task.backend=dm_control only"),
        (["critic=sparse", "scale.sparsity=1.0"], "scale.sparsity=1.0: allowed a number in [0.0, 1.0)"),
    ],
)
def test_invalid_config_is_one_line_naming_key_value_and_allowed(overrides: list[str], expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        compose_config(overrides)
    message = str(info.value)
    assert "\n" not in message
    assert expected in message


def test_group_sweeps_and_hydra_keys_pass_the_override_check() -> None:
    check_overrides(["critic=lora,sparse", "seed=0,1", "hydra.run.dir=/tmp/x", "task=glob(dmc/walker-*)"])


@settings(max_examples=40, deadline=None)
@given(rank=st.integers(-4, 1100), hidden=st.sampled_from([32, 512, 1024]))
def test_lora_rank_is_valid_exactly_in_one_to_hidden(default_cfg, rank: int, hidden: int) -> None:
    cfg = default_cfg.copy()
    OmegaConf.update(cfg, "critic.rank", rank)
    OmegaConf.update(cfg, "scale.critic_hidden_dim", hidden)
    if 1 <= rank <= hidden:
        validate_config(cfg)
    else:
        with pytest.raises(ConfigError, match=rf"^critic\.rank={rank}: allowed an integer in \[1, {hidden}\]$"):
            validate_config(cfg)


@settings(max_examples=40, deadline=None)
@given(
    key=st.sampled_from(["algo.lr_init", "algo.lr_final", "algo.temperature_init", "critic.alpha"]),
    value=st.floats(-1.0, 1.0, allow_nan=False),
)
def test_rates_are_valid_exactly_when_positive(default_cfg, key: str, value: float) -> None:
    cfg = default_cfg.copy()
    OmegaConf.update(cfg, key, value)
    if value > 0:
        validate_config(cfg)
    else:
        with pytest.raises(ConfigError, match=rf"^{key}="):
            validate_config(cfg)


def test_merge_overrides_keeps_order_and_lets_the_later_win() -> None:
    merged = merge_overrides(["task=dmc/walker-walk", "seed=1", "total_env_steps=300"], ["total_env_steps=600", "resume=r"])
    assert merged == ["task=dmc/walker-walk", "seed=1", "total_env_steps=600", "resume=r"]


def test_resume_may_change_run_control_keys_only(default_cfg) -> None:
    saved = OmegaConf.to_container(default_cfg, resolve=True)
    changed = dict(saved, total_env_steps=2_000_000, logger="wandb", wandb=dict(saved["wandb"], mode="online"))
    check_resume_compatible(changed, saved)
    changed["algo"] = dict(saved["algo"], compile=not saved["algo"]["compile"])  # execution only, same math
    check_resume_compatible(changed, saved)
    changed["algo"] = dict(saved["algo"], lr_init=2e-4)
    with pytest.raises(ConfigError, match=r"^algo\.lr_init=0\.0002: a resumed run must keep the checkpoint's value 0\.0001"):
        check_resume_compatible(changed, saved)


@pytest.mark.parametrize(("text", "expected"), [("dmc/cheetah-run", "dmc-cheetah-run"), ("a b//c", "a-b-c")])
def test_path_safe(text: str, expected: str) -> None:
    assert path_safe(text) == expected


@pytest.mark.parametrize(
    ("task", "steps_per_env"),
    [("Isaac-Velocity-Flat-H1-v0", 75_000), ("Isaac-Velocity-Flat-G1", 50_000), ("Isaac-Velocity-Rough-H1-v0", 50_000),
     ("Isaac-Velocity-Rough-G1-v0", 50_000), ("Isaac-Repose-Cube-Allegro-Direct-v0", 100_000),
     ("Isaac-Reorient-Cube-Shadow-Direct", 100_000)],
)
def test_an_isaac_lab_task_trains_its_own_budget_per_env(task: str, steps_per_env: int) -> None:
    cfg = compose_config([f"task={task}", "device=cpu"])
    assert cfg.task.steps_per_env == steps_per_env and cfg.total_env_steps == steps_per_env * 4096
    assert compose_config([f"task={task}", "device=cpu", "algo.num_envs=512"]).total_env_steps == steps_per_env * 512
    assert compose_config([f"task={task}", "device=cpu", "total_env_steps=1000"]).total_env_steps == 1000
    assert compose_config(["task=dmc/walker-walk"]).total_env_steps == 1_000_000  # no budget per env: 1M env steps


def test_lora_alpha_follows_the_rank_unless_set() -> None:
    assert compose_config(["critic.rank=8"]).critic.alpha == 8  # scale 1 at every rank of a sweep
    assert compose_config(["critic.rank=8", "critic.alpha=32"]).critic.alpha == 32
    ranks = compose_config(["experiment=ablation_rank_budget"], with_hydra=True).hydra.sweeper.params["critic.rank"]
    for rank in ranks.split(","):
        assert compose_config(["experiment=ablation_rank_budget", f"critic.rank={rank}"]).critic.alpha == int(rank)

