"""Isaac Lab wrapper against the GPU-free stand-in (tests/isaaclab_standin.py): specs, asymmetric critic
observations, action clipping, in-step auto-reset with and without true final observations, time-outs as
truncations; the 2.x <-> 3.0 id table and task configs; the launcher's errors without Isaac Lab."""

from __future__ import annotations

import contextlib
import importlib
import subprocess
import sys
import types
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tensordict import TensorDict
from torchrl.envs import check_env_specs

import fasttd3_lora.tasks.isaaclab as isaaclab
from fasttd3_lora.config import compose_config, group_options
from fasttd3_lora.envs import env_deploy_facts
from fasttd3_lora.tasks.isaaclab import IsaacLabEnv, IsaacLabUnavailable, detect_isaaclab, make_isaaclab_env
from fasttd3_lora.tasks.isaaclab_marl import MARL_TASKS
from fasttd3_lora.tasks.isaaclab_names import TASKS, list_isaaclab_tasks, lookup_isaaclab_task

import isaaclab_standin as standin


# DESIGN §7, row by row.
DESIGN_TABLE = [
    ("Isaac-Velocity-Flat-H1-v0", "Isaac-Velocity-Flat-H1", 69, 19, 1000, "locomotion"),
    ("Isaac-Velocity-Flat-G1-v0", "Isaac-Velocity-Flat-G1", 123, 37, 1000, "locomotion"),
    ("Isaac-Velocity-Rough-H1-v0", "Isaac-Velocity-Rough-H1", 256, 19, 1000, "locomotion"),
    ("Isaac-Velocity-Rough-G1-v0", "Isaac-Velocity-Rough-G1", 310, 37, 1000, "locomotion"),
    ("Isaac-Repose-Cube-Allegro-Direct-v0", "Isaac-Reorient-Cube-Allegro-Direct", 124, 16, 300, "manipulation"),
    ("Isaac-Repose-Cube-Shadow-Direct-v0", "Isaac-Reorient-Cube-Shadow-Direct", 157, 20, 600, "manipulation"),
]
N, DIM = 128, 3


def make(num_envs: int = N, **kwargs) -> tuple[IsaacLabEnv, standin.StandInIsaacLabEnv]:
    gym_env = standin.make_standin(num_envs, DIM, **kwargs)
    return IsaacLabEnv(gym_env, task="standin"), gym_env.unwrapped


def random_actions(n: int = N, scale: float = 1.0, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return scale * (2 * torch.rand(n, DIM, generator=gen) - 1)


# ------------------------------------------------------------------------------------------- names and configs


@pytest.mark.parametrize("row", DESIGN_TABLE, ids=[r[0] for r in DESIGN_TABLE])
def test_ids_map_both_ways(row) -> None:
    id_2x, id_3x, obs, act, steps, family = row
    task = lookup_isaaclab_task(id_2x)
    assert lookup_isaaclab_task(id_3x) is task
    assert (task.gym_id("2.x"), task.gym_id("3.0")) == (id_2x, id_3x)
    assert (task.obs_dim, task.act_dim, task.episode_steps, task.family) == (obs, act, steps, family)


def test_table_has_exactly_the_design_tasks() -> None:
    assert list_isaaclab_tasks() == [r[0] for r in DESIGN_TABLE]
    assert [t.id_3x for t in TASKS] == [r[1] for r in DESIGN_TABLE]


@pytest.mark.parametrize(
    ("bad", "suggestion"),
    [
        ("Isaac-Velocity-Rough-G1-v1", "Isaac-Velocity-Rough-G1-v0"),
        ("Isaac-Reorient-Cube-Shadow", "Isaac-Reorient-Cube-Shadow-Direct"),
        ("Isaac-Velocity-Flat-H2-v0", "Isaac-Velocity-Flat-H1-v0"),
    ],
)
def test_unknown_id_names_close_matches(bad: str, suggestion: str) -> None:
    with pytest.raises(ValueError, match="close matches") as err:
        lookup_isaaclab_task(bad)
    assert suggestion in str(err.value) and bad in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ValueError, match=suggestion):  # the launcher checks the name before anything else
        make_isaaclab_env(bad, 64, 0, "cpu")


def test_unrelated_id_lists_the_supported_tasks() -> None:
    with pytest.raises(ValueError, match="supported: Isaac-Velocity-Flat-H1-v0"):
        lookup_isaaclab_task("Cartpole")
    with pytest.raises(ValueError, match="allowed 2.x, 3.0"):
        TASKS[0].gym_id("4.0")


def test_task_configs_cover_both_ids_and_nothing_else() -> None:
    # `_*.yaml` files are shared pieces the task files include, not options (config.group_options); the other
    # families' tasks live in their own folders (dmc/, metaworld/, vmas/, mamujoco/); Isaac Lab's multi-agent tasks
    # sit beside the paper's, under both ids too
    isaac = {o for o in group_options("task") if "/" not in o}
    marl = set(MARL_TASKS) | set(MARL_TASKS.values())
    assert isaac == {r[0] for r in DESIGN_TABLE} | {r[1] for r in DESIGN_TABLE} | marl


@pytest.mark.parametrize("row", DESIGN_TABLE, ids=[r[0] for r in DESIGN_TABLE])
def test_task_config_matches_the_table_under_either_id(row) -> None:
    id_2x, id_3x, obs, act, steps, family = row
    recipe = {"locomotion": (4, 8, -10.0, 10.0), "manipulation": (2, 1, -500.0, 500.0)}[family]
    buffer = 5120 if "Rough" in id_2x else 10240  # FastTD3's public Isaac Lab args
    for choice in (id_2x, id_3x):
        task = compose_config([f"task={choice}"], check=False).task
        assert (task.name, task.family, task.category) == (id_2x, "isaaclab", family)
        assert (task.obs_dim, task.act_dim, task.max_episode_steps) == (obs, act, steps)
        fast = task.fasttd3
        assert (fast.updates_per_step, fast.n_step, fast.v_min, fast.v_max) == recipe
        assert fast.buffer_size == buffer
        assert (task.physics, task.headless) == (None, True)


# ------------------------------------------------------------------------------------------------ launcher


def test_import_needs_no_isaac_lab() -> None:
    """Importing the wrapper (and the app's env builders) brings none of Isaac Lab's stack: checked in a fresh
    process, since other tests of a session import gymnasium (EnvPool does)."""
    heavy = ("isaaclab", "isaaclab_tasks", "isaacsim", "omni", "gymnasium")
    code = ("import sys, fasttd3_lora.tasks.isaaclab, fasttd3_lora.envs; "
            f"print(sorted(m for m in sys.modules if m.split('.')[0] in {heavy!r}))")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.skipif(detect_isaaclab() is not None, reason="Isaac Lab is installed here")
def test_missing_isaac_lab_is_one_line_saying_how_to_get_it() -> None:
    with pytest.raises(IsaacLabUnavailable) as err:
        make_isaaclab_env("Isaac-Velocity-Rough-G1", 64, 0, "cpu")
    message = str(err.value)
    assert "\n" not in message and isinstance(err.value, RuntimeError)
    assert "docker compose run --rm train task=Isaac-Velocity-Rough-G1-v0" in message
    assert "pip install 'isaaclab[isaacsim,all]'" in message


@pytest.mark.parametrize("api", ["2.x", "3.0"])
def test_isaac_lab_that_fails_to_import_is_one_line(monkeypatch, api: str) -> None:
    monkeypatch.setattr(isaaclab, "detect_isaaclab", lambda: api)
    for name in ("isaaclab", "isaaclab.app", "isaaclab_tasks", "isaaclab_tasks.utils", "gymnasium"):
        monkeypatch.setitem(sys.modules, name, None)  # any import of these raises ImportError
    with pytest.raises(IsaacLabUnavailable, match=f"Isaac Lab {api} is installed but failed to import") as err:
        make_isaaclab_env("Isaac-Repose-Cube-Allegro-Direct-v0", 64, 0, "cuda:0")
    assert "\n" not in str(err.value) and "docker compose run" in str(err.value)


def test_2x_refuses_another_physics_engine(monkeypatch) -> None:
    monkeypatch.setattr(isaaclab, "detect_isaaclab", lambda: "2.x")
    with pytest.raises(ValueError, match="physics='newton_mjwarp' needs Isaac Lab 3.0"):
        make_isaaclab_env("Isaac-Velocity-Flat-G1-v0", 64, 0, "cuda:0", physics="newton_mjwarp")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_envs": 0}, "num_envs must be an int >= 1, got 0"),
        ({"num_envs": True}, "num_envs must be an int >= 1, got True"),
        ({"seed": -1}, r"seed must be an int in \[0, 2\*\*32\), got -1"),
        ({"device": "gpu"}, "device must be cpu, cuda or cuda:<index>, got 'gpu'"),
        ({"physics": "bullet"}, "physics must be None or one of isaacsim_physx, .*got 'bullet'"),
    ],
)
def test_bad_launcher_arguments(kwargs: dict, message: str) -> None:
    args = {"num_envs": 64, "seed": 0, "device": "cuda:0", "physics": None} | kwargs
    with pytest.raises(ValueError, match=message):
        make_isaaclab_env("Isaac-Velocity-Flat-G1-v0", **args)


@pytest.mark.parametrize(("launcher_file", "expected"), [("app_launcher.py", "2.x"), ("sim_launcher.py", "3.0")])
def test_detects_the_api_from_files_without_importing(tmp_path, monkeypatch, launcher_file, expected) -> None:
    app = tmp_path / "isaaclab" / "app"
    app.mkdir(parents=True)
    (tmp_path / "isaaclab" / "__init__.py").write_text("raise RuntimeError('imported')\n")
    body = "def launch_simulation(cfg, args):\n    pass\n" if expected == "3.0" else "class AppLauncher:\n    pass\n"
    (app / launcher_file).write_text(body)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "isaaclab", raising=False)
    importlib.invalidate_caches()
    assert detect_isaaclab() == expected
    assert "isaaclab" not in sys.modules


# ------------------------------------------------------------------------------------------------- wrapper


def test_specs_keys_shapes_and_dtypes() -> None:
    env, raw = make()
    check_env_specs(env)  # a short rollout against the declared specs
    td = env.reset()
    assert td["observation"].shape == (N, 2 * DIM) and td["observation"].dtype == torch.float32
    assert td["critic_observation"].shape == (N, 3 * DIM + 1)
    out = env.step(td.set("action", random_actions()))["next"]
    assert out["reward"].shape == (N, 1) and out["reward"].dtype == torch.float32
    for key in ("done", "terminated", "truncated"):
        assert out[key].shape == (N, 1) and out[key].dtype == torch.bool
    assert env.batch_size == (N,) and env.device == torch.device("cpu")
    assert env.action_spec.shape == (N, DIM) and env.critic_dim == 3 * DIM + 1
    assert (env.max_episode_steps, env.control_period) == (raw.max_episode_length, raw.step_dt)


def test_without_critic_group_there_is_no_critic_observation() -> None:
    env, _ = make(critic=False)
    td = env.reset()
    assert "critic_observation" not in td.keys() and "critic_observation" not in env.observation_spec.keys()
    assert env.critic_dim is None


def test_asymmetric_critic_observation_is_the_critic_group() -> None:
    env, raw = make(final_obs=True)
    td = env.reset()
    truth = raw._observations()
    torch.testing.assert_close(td["observation"], truth["policy"], rtol=0, atol=0)
    torch.testing.assert_close(td["critic_observation"], truth["critic"], rtol=0, atol=0)
    for _ in range(5):
        data, td = env.step_and_maybe_reset(td.set("action", random_actions()))
        truth = raw._observations()  # after the in-step reset: what the env returned
        torch.testing.assert_close(td["critic_observation"], truth["critic"], rtol=0, atol=0)


@settings(max_examples=25, deadline=None)
@given(
    st.lists(st.floats(min_value=-1e6, max_value=1e6, allow_nan=False, width=32), min_size=DIM, max_size=DIM),
    st.sampled_from(["manager", "direct"]),
)
def test_actions_are_clipped_and_the_reported_map_is_the_action_terms(values: list[float], workflow: str) -> None:
    """The wrapper hands Isaac Lab the clipped action; `action_offset + action_scale * action` is the joint command
    the task's action term computes from it (what deploy.yaml tells the robot)."""
    env, raw = make(num_envs=64, workflow=workflow, action_offset=0.1)
    td = env.reset()
    action = torch.tensor(values).expand(64, DIM).clone()
    env.step(td.set("action", action))
    clipped = action.clamp(-1.0, 1.0)
    torch.testing.assert_close(raw.raw_actions, clipped, rtol=0, atol=0)
    average = env.action_moving_average
    assert env.action_map_known and (average is None if workflow == "manager" else torch.equal(average, torch.ones(DIM)))
    torch.testing.assert_close(raw.processed_actions, env.action_offset + env.action_scale * clipped)
    assert not torch.equal(env.action_offset, torch.zeros(DIM))  # a real offset, not the identity map


def test_action_map_unknown_when_it_differs_between_envs_and_moving_average_reported() -> None:
    gym_env = standin.make_standin(8, DIM, action_offset=0.1)
    gym_env.unwrapped.action_manager.get_term("joint_pos")._offset[3] += 0.5  # e.g. randomised default joint pos
    env = IsaacLabEnv(gym_env, task="standin")
    assert not env.action_map_known
    assert torch.equal(env.action_scale, torch.ones(DIM)) and torch.equal(env.action_offset, torch.zeros(DIM))
    env, _ = make(num_envs=8, workflow="direct", act_moving_average=0.3)
    assert env.action_map_known and torch.equal(env.action_moving_average, torch.full((DIM,), 0.3))
    torch.testing.assert_close(env.action_offset - env.action_scale, -1.0 - 0.1 * torch.arange(1, DIM + 1))


def test_bad_actions_are_refused() -> None:
    env, _ = make(num_envs=64)
    td = env.reset()
    nan = random_actions(64)
    nan[3, 1] = float("nan")
    with pytest.raises(ValueError, match="1 NaN"):
        env.step(td.clone().set("action", nan))
    with pytest.raises(ValueError, match=r"action must have shape \(64, 3\), got \(64, 2\)"):
        env._step(TensorDict({"action": torch.zeros(64, 2)}, batch_size=[64]))


@pytest.mark.parametrize("final_obs", [True, False], ids=["3.0-final-obs", "2.x-reset-obs"])
def test_auto_reset_semantics_match_the_env(final_obs: bool) -> None:
    env, raw = make(num_envs=256, final_obs=final_obs, max_episode_length=15, termination_prob=0.02)
    assert env.has_final_obs is final_obs
    td = env.reset()
    seen_terminated = seen_truncated = 0
    for t in range(40):
        data, td = env.step_and_maybe_reset(td.set("action", random_actions(256, seed=t)))
        nxt = data["next"]
        done = raw.last_reset_mask
        assert torch.equal(nxt["done"].squeeze(-1), done)
        now = raw._observations()  # the env's state after its in-step reset
        # The root observation for the next step is what the env returned (reset obs for finished envs).
        torch.testing.assert_close(td["observation"], now["policy"], rtol=0, atol=0)
        torch.testing.assert_close(td["critic_observation"], now["critic"], rtol=0, atol=0)
        assert not td["done"].any()
        expected = raw.last_pre_reset_obs if final_obs else now
        rows = done.unsqueeze(-1)
        for key, group in (("observation", "policy"), ("critic_observation", "critic")):
            want = torch.where(rows, expected[group], now[group])
            torch.testing.assert_close(nxt[key], want, rtol=0, atol=0)
        if final_obs and done.any():  # the final observation really differs from the reset one
            assert not torch.equal(nxt["observation"][done], now["policy"][done])
        seen_terminated += int(nxt["terminated"].sum())
        seen_truncated += int(nxt["truncated"].sum())
    assert seen_terminated > 0 and seen_truncated > 0  # both paths were exercised
    assert raw.num_resets_called == 1  # every later reset was Isaac Lab's own, handed out by the wrapper


def test_time_outs_are_truncations_and_terminations_win() -> None:
    env, raw = make(max_episode_length=15, termination_prob=0.05)
    td = env.reset()
    for t in range(30):
        data, td = env.step_and_maybe_reset(td.set("action", random_actions(seed=t)))
        nxt = data["next"]
        assert torch.equal(nxt["terminated"].squeeze(-1), raw.reset_terminated)
        assert torch.equal(nxt["truncated"].squeeze(-1), raw.reset_time_outs & ~raw.reset_terminated)
    env, raw = make(max_episode_length=1, termination_prob=1.0)  # every step: termination and time-out at once
    data = env.step(env.reset().set("action", random_actions()))
    assert raw.reset_time_outs.all() and data["next", "terminated"].all() and not data["next", "truncated"].any()


def test_finite_horizon_tasks_report_time_outs_as_terminations() -> None:
    env, raw = make(max_episode_length=1, termination_prob=0.0, is_finite_horizon=True)
    data = env.step(env.reset().set("action", random_actions()))
    assert raw.reset_time_outs.all() and not raw.reset_terminated.any()
    assert data["next", "terminated"].all() and not data["next", "truncated"].any()


def test_outputs_do_not_alias_the_env_buffers() -> None:
    env, raw = make(final_obs=True)
    td = env.reset()
    data, td = env.step_and_maybe_reset(td.set("action", random_actions(seed=1)))
    kept = data["next"].clone()
    env.step_and_maybe_reset(td.set("action", random_actions(seed=2)))  # the env rewrites its buffers in place
    assert torch.equal(data["next", "reward"], kept["reward"]) and not torch.equal(kept["reward"].squeeze(-1), raw.reward_buf)
    assert torch.equal(data["next", "terminated"], kept["terminated"])


def test_stepping_a_finished_env_before_its_reset_raises() -> None:
    env, _ = make(max_episode_length=1, termination_prob=0.0)
    td = env.reset().set("action", random_actions())
    env.step(td)
    with pytest.raises(RuntimeError, match="must be reset before stepping"):
        env.step(td)
    env.reset(TensorDict({"_reset": torch.ones(N, 1, dtype=torch.bool)}, batch_size=[N]))
    env.step(td)  # served from the env's own reset: no error


def test_resetting_a_running_env_is_refused_and_a_full_reset_reaches_the_env() -> None:
    env, raw = make(max_episode_length=1000, termination_prob=0.0)
    td = env.reset()
    env.step(td.set("action", random_actions()))
    mask = torch.zeros(N, 1, dtype=torch.bool)
    mask[5] = True
    with pytest.raises(ValueError, match=r"cannot reset running envs \[5\]"):
        env.reset(TensorDict({"_reset": mask}, batch_size=[N]))
    before = raw.num_resets_called
    env.reset()
    assert raw.num_resets_called == before + 1


def test_rollout_runs_through_many_episodes() -> None:
    env, _ = make(final_obs=True, max_episode_length=10)
    rollout = env.rollout(35, break_when_any_done=False)
    assert rollout.batch_size == (N, 35)
    assert rollout["next", "truncated"].any(dim=1).all()  # every env timed out at least once


@pytest.mark.parametrize("workflow", ["manager", "direct"])
def test_export_facts(workflow: str) -> None:
    env, _ = make(workflow=workflow)
    assert env.joint_names == ["joint_0", "joint_1", "joint_2"]  # action order, not articulation order
    layout = env.observation_layout()
    assert layout == ([("target_offset", (DIM,)), ("velocity", (DIM,))] if workflow == "manager" else None)


def test_size_mismatch_with_the_table_warns() -> None:
    with pytest.warns(UserWarning, match="obs/act dims 6/3, the paper's runs 310/37"):
        IsaacLabEnv(standin.make_standin(64, DIM), task="Isaac-Velocity-Rough-G1-v0")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        IsaacLabEnv(standin.make_standin(64, DIM), task="standin")  # unknown names: no size check


def test_close_closes_the_env_then_the_simulator() -> None:
    calls = []
    gym_env = standin.make_standin(64, DIM)
    with IsaacLabEnv(gym_env, task="standin", close_fn=lambda: calls.append(gym_env.unwrapped.closed)) as env:
        env.reset()
    assert calls == [True] and env.is_closed
    with pytest.raises(RuntimeError, match="already closed"):
        env.close()


# --------------------------------------------------- Isaac Lab 3.0: the Shadow hand's tendons, the launcher


def test_a_3_0_shadow_hand_maps_and_names_its_tendons() -> None:
    """Isaac Lab 3.0's Shadow hand: 16 joint actions then 4 tendon actions (20 in all)."""
    gym_env = standin.make_standin(8, 20, workflow="direct", tendons=4, act_moving_average=0.3)
    env = IsaacLabEnv(gym_env, task="Isaac-Repose-Cube-Shadow-Direct-v0")
    raw = gym_env.unwrapped
    assert env.joint_names == [f"joint_{i}" for i in range(16)] + [f"tendon_{j}" for j in range(4)]
    assert env.action_map_known
    torch.testing.assert_close(env.action_moving_average, torch.cat([torch.full((16,), 0.3), torch.ones(4)]))
    td = env.reset()
    action = 2 * torch.rand(8, 20, generator=torch.Generator().manual_seed(1)) - 1
    env.step(td.set("action", action))
    # first step from a zero target: joints move m of the way, tendons all of it (no moving average)
    command = env.action_offset + env.action_scale * action
    torch.testing.assert_close(raw.processed_actions[:, 16:], command[:, 16:])
    torch.testing.assert_close(raw.processed_actions[:, :16], 0.3 * command[:, :16])
    facts = env_deploy_facts(env)["action"]
    assert len(facts["joint_names"]) == 20 and facts["moving_average"][-4:] == [1.0] * 4


class FakeIsaacLab30:
    """The part of Isaac Lab 3.0's API the launcher calls, as checked on the 3.0.0 wheel: task configs resolve
    before launch with `parse_env_cfg(id, device=, num_envs=, overrides=["physics=<preset>"])` (an unknown preset
    is a ValueError), `launch_simulation(cfg, launcher_args)` is a context manager that exits the process
    (SystemExit(1), after logging) when the config needs Isaac Sim and none is installed."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, *, launch_exits: bool = False, env_factory=None) -> None:
        self.calls: dict[str, object] = {}
        self.launch_closed = False
        self.env_closed = False
        fake = self

        @contextlib.contextmanager
        def launch_simulation(cfg, launcher_args):
            fake.calls["launch"] = dict(launcher_args)
            if launch_exits:
                raise SystemExit(1)
            try:
                yield None
            finally:
                fake.launch_closed = True

        def parse_env_cfg(task_name, device=None, num_envs=None, use_fabric=None, overrides=()):
            fake.calls["parse"] = (task_name, device, num_envs, list(overrides))
            if any(o.split("=", 1)[1] not in ("isaacsim_physx", "newton_mjwarp") for o in overrides):
                raise ValueError(f"Unknown preset(s): {overrides[0].split('=', 1)[1]}")
            return types.SimpleNamespace(seed=None, compute_final_obs=False)

        def make(gym_id, cfg, render_mode=None):
            fake.calls["make"] = (gym_id, cfg)
            fake.calls["render_mode"] = render_mode
            env = (env_factory or (lambda: standin.make_standin(8, 3, final_obs=True, render_mode=render_mode)))()
            close = env.close

            def closing():
                fake.env_closed = True
                close()

            env.close = closing
            return env

        modules = {"isaaclab": types.ModuleType("isaaclab"), "isaaclab.app": types.ModuleType("isaaclab.app"),
                   "isaaclab_tasks": types.ModuleType("isaaclab_tasks"),
                   "isaaclab_tasks.utils": types.ModuleType("isaaclab_tasks.utils"),
                   "gymnasium": types.ModuleType("gymnasium")}  # fmt: skip
        modules["isaaclab.app"].launch_simulation = launch_simulation
        modules["isaaclab_tasks.utils"].parse_env_cfg = parse_env_cfg
        modules["gymnasium"].make = make
        for name, module in modules.items():
            monkeypatch.setitem(sys.modules, name, module)
        monkeypatch.setattr(isaaclab, "detect_isaaclab", lambda: "3.0")


def test_3_0_physics_is_the_tasks_preset_not_a_launcher_rebuild(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeIsaacLab30(monkeypatch)
    env = make_isaaclab_env("Isaac-Velocity-Rough-G1-v0", 8, 5, "cpu", physics="newton_mjwarp")
    assert fake.calls["parse"] == ("Isaac-Velocity-Rough-G1", "cpu", 8, ["physics=newton_mjwarp"])
    assert "physics" not in fake.calls["launch"] and fake.calls["launch"]["device"] == "cpu"
    cfg = fake.calls["make"][1]
    assert cfg.seed == 5 and cfg.compute_final_obs is True
    env.close()
    assert fake.env_closed and fake.launch_closed
    make_isaaclab_env("Isaac-Velocity-Rough-G1-v0", 8, 5, "cpu").close()  # default: the paper's PhysX
    assert fake.calls["parse"][3] == ["physics=isaacsim_physx"]
    with pytest.raises(ValueError, match=r"^physics=ovphysx: Isaac-Velocity-Rough-G1 has no such preset \(Unknown"):
        make_isaaclab_env("Isaac-Velocity-Rough-G1-v0", 8, 5, "cpu", physics="ovphysx")


def test_a_rendering_env_has_cameras_and_rgb_frames_and_others_refuse_frames(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeIsaacLab30(monkeypatch)
    env = make_isaaclab_env("Isaac-Velocity-Rough-G1-v0", 8, 5, "cpu", render=True)
    assert fake.calls["launch"]["enable_cameras"] is True and fake.calls["render_mode"] == "rgb_array"
    env.reset()
    frame = env.render_frame()
    assert frame.shape == (48, 64, 3) and frame.dtype == np.uint8 and frame.max() == 255
    env.close()
    plain = make_isaaclab_env("Isaac-Velocity-Rough-G1-v0", 8, 5, "cpu")
    assert "enable_cameras" not in fake.calls["launch"] and fake.calls["render_mode"] is None
    with pytest.raises(ValueError, match="frames need the env made with render=True"):
        plain.render_frame()
    plain.close()


def test_3_0_without_isaac_sim_is_one_line_naming_what_runs_without_it(monkeypatch: pytest.MonkeyPatch) -> None:
    FakeIsaacLab30(monkeypatch, launch_exits=True)
    with pytest.raises(IsaacLabUnavailable) as err:
        make_isaaclab_env("Isaac-Velocity-Rough-G1-v0", 8, 0, "cpu")
    message = str(err.value)
    assert "\n" not in message and "could not start physics=isaacsim_physx (exit status 1)" in message
    assert "need Isaac Sim" in message and "task.physics=newton_mjwarp runs without it" in message


def test_a_wrapper_that_cannot_be_built_closes_the_env_and_the_simulation(monkeypatch: pytest.MonkeyPatch) -> None:
    broken = lambda: standin.make_standin(8, 3, workflow="direct", tendons=1)  # noqa: E731
    fake = FakeIsaacLab30(monkeypatch, env_factory=broken)
    monkeypatch.setattr(isaaclab, "_joint_names", lambda unwrapped: 1 / 0)  # any failure while wrapping
    with pytest.raises(ZeroDivisionError):
        make_isaaclab_env("Isaac-Velocity-Rough-G1-v0", 8, 0, "cpu")
    assert fake.env_closed and fake.launch_closed


def test_the_app_turns_a_missing_isaac_sim_into_a_one_line_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """What the app prints before exiting with code 2 (the env builder's ConfigError; Hydra's job is not run
    in-process: it configures logging process-wide)."""
    from fasttd3_lora.checks import ConfigError
    from fasttd3_lora.envs import EnvRequest, make_envs

    FakeIsaacLab30(monkeypatch, launch_exits=True)
    task = compose_config(["task=Isaac-Velocity-Rough-G1-v0", "device=cpu"]).task
    with pytest.raises(ConfigError) as err:
        make_envs(EnvRequest(task, 8, 1, 0, "cpu", 1))
    assert "\n" not in str(err.value)
    assert str(err.value).startswith("Isaac-Velocity-Rough-G1-v0: Isaac Lab 3.0 could not start physics=isaacsim_physx")


def test_episode_starts_are_spread_so_envs_do_not_time_out_together() -> None:
    from fasttd3_lora.loops.kit import start_episodes

    env, raw = make(num_envs=64, max_episode_length=40, termination_prob=0.0, bound=1e9)
    start_episodes(env, seed=3, env_step=0)
    clocks = raw.episode_length_buf.clone()
    assert clocks.min() >= 0 and clocks.max() < 40 and len(clocks.unique()) > 20  # spread over the episode
    td = start_episodes(env, seed=3, env_step=0)
    assert torch.equal(raw.episode_length_buf, clocks)  # the same seed and step: the same clocks (exact resume)
    first_timeouts = []
    for _ in range(40):
        data, td = env.step_and_maybe_reset(td.set("action", torch.zeros(64, DIM)))
        first_timeouts.append(int(data["next", "truncated"].sum()))
    assert max(first_timeouts) < 8 and sum(first_timeouts) == 64  # each env times out once, a few at a time
