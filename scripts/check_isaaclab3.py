"""Check this stack's Isaac Lab 3.0 calls against the real `isaaclab` 3.0.0 wheel, on a CPU (no Isaac Sim, no GPU).

Run by scripts/check_isaaclab3.sh in a Python 3.12 venv that has `isaaclab==3.0.0` (~8 GB) and this package on
its path; not part of CI (it downloads the wheel). It prints one line per check and exits 1 if any fails:

* the six paper tasks resolve under their 3.0 ids with `parse_env_cfg(id, device="cpu", num_envs=..,
  overrides=["physics=<preset>"])`, and each preset keeps the task's tuned engine settings (DESIGN §7);
* the names the wrapper reads exist: `parse_env_cfg(..., overrides=)`, `launch_simulation(cfg, launcher_args)`,
  the Shadow hand's `actuated_tendon_indices` / `tendon_lower_limits` / `tendon_upper_limits`, the
  articulation's `fixed_tendon_names`, `compute_final_obs`;
* the two multi-agent tasks resolve under their 3.0 ids with the agents, spaces and state the configs and docs
  name, and `DirectMARLEnv` has what `fasttd3_lora.tasks.isaaclab_marl` calls (`_reset_idx`, `_get_states`,
  `state`, `compute_final_obs` and its `extras[agent]["final_obs"]`);
* without Isaac Sim, launching a PhysX (Kit) task exits with SystemExit(1), which the wrapper turns into one line.

Stepping a real env needs the task's assets from the internet (and an RTX GPU for PhysX): not checked here.
"""

from __future__ import annotations

import inspect
import sys

import isaaclab_tasks  # noqa: F401  (registers the gym ids)
from isaaclab.app import launch_simulation
from isaaclab_tasks.utils import parse_env_cfg

from fasttd3_lora.tasks.isaaclab import PHYSICS_BACKENDS
from fasttd3_lora.tasks.isaaclab_marl import MARL_TASKS
from fasttd3_lora.tasks.isaaclab_names import TASKS

FAILED: list[str] = []


def check(ok: bool, what: str) -> None:
    print(f"{'ok  ' if ok else 'FAIL'} {what}", flush=True)
    if not ok:
        FAILED.append(what)


def engine(cfg) -> dict:
    """The tuned settings a physics preset carries (Newton solver limits, PhysX buffers)."""
    physics = cfg.sim.physics
    keys = ("num_substeps", "njmax", "nconmax", "integrator", "gpu_max_rigid_patch_count", "bounce_threshold_velocity")
    found = {k: getattr(physics, k) for k in keys if hasattr(physics, k)}
    solver = getattr(physics, "solver_cfg", None)
    found.update({k: getattr(solver, k) for k in ("njmax", "nconmax", "integrator") if solver is not None and hasattr(solver, k)})
    return {"engine": type(physics).__name__, **found}


def main() -> None:
    check("overrides" in inspect.signature(parse_env_cfg).parameters, "parse_env_cfg takes overrides=")
    check(list(inspect.signature(launch_simulation.__wrapped__).parameters)[:2] == ["cfg", "launcher_args"],
          "launch_simulation(cfg, launcher_args)")
    for task in TASKS:
        for preset in ("isaacsim_physx", "newton_mjwarp"):
            try:
                cfg = parse_env_cfg(task.id_3x, device="cpu", num_envs=16, overrides=[f"physics={preset}"])
            except Exception as err:  # noqa: BLE001 (report every failure, not just the first)
                check(False, f"{task.id_3x} physics={preset}: {type(err).__name__}: {err}")
                continue
            check(hasattr(cfg, "compute_final_obs") and cfg.scene.num_envs == 16,
                  f"{task.id_3x} physics={preset}: {engine(cfg)}")
    check(set(PHYSICS_BACKENDS) >= {"isaacsim_physx", "newton_mjwarp"}, f"our presets {PHYSICS_BACKENDS}")

    from isaaclab.assets.articulation.base_articulation import BaseArticulation
    from isaaclab_tasks.core.reorient.config.shadow_hand.shadow_hand_direct_env import ShadowHandDirectEnv

    source = inspect.getsource(ShadowHandDirectEnv)
    for name in ("actuated_tendon_indices", "tendon_lower_limits", "tendon_upper_limits"):
        check(name in source, f"ShadowHandDirectEnv sets {name}")
    check(hasattr(BaseArticulation, "fixed_tendon_names"), "articulations name their fixed tendons")

    # the multi-agent tasks: (agents, observation sizes, action sizes, state_space) as docs/mappo.md gives them
    expected = {"Isaac-Pendulum-MARL-Direct": (["cart", "pendulum"], [4, 3], [1, 1], -1),
                "Isaac-Shadow-Handover-Direct": (["right_hand", "left_hand"], [157, 157], [20, 20], 290)}  # fmt: skip
    check(set(expected) == set(MARL_TASKS.values()), f"multi-agent 3.0 ids {sorted(MARL_TASKS.values())}")
    for id_3x, (agents, obs, act, state) in expected.items():
        cfg = parse_env_cfg(id_3x, device="cpu", num_envs=16, overrides=["physics=newton_mjwarp"])
        found = (list(cfg.possible_agents), [cfg.observation_spaces[a] for a in agents],
                 [cfg.action_spaces[a] for a in agents], cfg.state_space)  # fmt: skip
        check(found == (agents, obs, act, state) and hasattr(cfg, "compute_final_obs"), f"{id_3x}: {found}")
    from isaaclab.envs import DirectMARLEnv

    marl = inspect.getsource(DirectMARLEnv)
    for name in ("def _reset_idx", "def _get_states", "def state", 'self.extras[agent]["final_obs"]'):
        check(name in marl, f"DirectMARLEnv has {name}")

    cfg = parse_env_cfg("Isaac-Velocity-Rough-G1", device="cpu", num_envs=16, overrides=["physics=isaacsim_physx"])
    try:
        with launch_simulation(cfg, {"device": "cpu", "visualizer": "none"}):
            exited = None
    except SystemExit as err:
        exited = err.code
    check(exited == 1 or "isaacsim" in sys.modules, f"PhysX without Isaac Sim exits with status {exited}")
    print(f"\n{len(FAILED)} failed", flush=True)
    sys.exit(1 if FAILED else 0)


if __name__ == "__main__":
    main()
