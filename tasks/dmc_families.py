"""DMC tasks that share an embodiment with a suite task and change only its goal (policy libraries, DESIGN §10):
the same robot, observations and actions, another reward. Each is named `dmc/<domain>-<task>` like the suite's.

* walker (stand 0, walk 1, run 8 m/s in the suite): `walker-speed_<v>` for v in `WALKER_SPEEDS`, dm_control's own
  `PlanarWalker(move_speed=v)`, so stand, walk, speed_2 ... speed_6 and run form one family of 8.
* cheetah (run: 10 m/s forward in the suite): `cheetah-speed_<v>` forward and `cheetah-back_<v>` backward for v in
  `CHEETAH_SPEEDS`, the suite's run reward with the target speed (and sign) changed.

`load(domain, task, task_kwargs)` builds any of them or any suite task (`dm_control.suite.load`'s signature);
`ALL_TASKS` lists both.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from dm_control import suite
from dm_control.rl import control
from dm_control.suite import cheetah, walker
from dm_control.utils import rewards

__all__ = ["WALKER_SPEEDS", "CHEETAH_SPEEDS", "EXTRA_TASKS", "ALL_TASKS", "load"]

WALKER_SPEEDS = (2, 3, 4, 5, 6)
CHEETAH_SPEEDS = (2, 4, 6, 8)


class CheetahAtSpeed(cheetah.Cheetah):
    """The suite's cheetah-run reward, `tolerance(direction * speed, bounds=(v, inf), margin=v)`, for any target
    speed `v` and direction (+1 forward, -1 backward)."""

    def __init__(self, target_speed: float, direction: int, random: Any = None) -> None:
        super().__init__(random=random)
        self._target_speed, self._direction = float(target_speed), direction

    def get_reward(self, physics: cheetah.Physics) -> float:
        return rewards.tolerance(self._direction * physics.speed(), bounds=(self._target_speed, float("inf")),
                                 margin=self._target_speed, value_at_margin=0, sigmoid="linear")  # fmt: skip


def _walker(speed: float, time_limit: float = walker._DEFAULT_TIME_LIMIT, random: Any = None,
            environment_kwargs: dict[str, Any] | None = None) -> control.Environment:  # fmt: skip
    physics = walker.Physics.from_xml_string(*walker.get_model_and_assets())
    return control.Environment(physics, walker.PlanarWalker(move_speed=speed, random=random), time_limit=time_limit,
                               control_timestep=walker._CONTROL_TIMESTEP, **(environment_kwargs or {}))  # fmt: skip


def _cheetah(speed: float, direction: int, time_limit: float = cheetah._DEFAULT_TIME_LIMIT, random: Any = None,
             environment_kwargs: dict[str, Any] | None = None) -> control.Environment:  # fmt: skip
    physics = cheetah.Physics.from_xml_string(*cheetah.get_model_and_assets())
    return control.Environment(physics, CheetahAtSpeed(speed, direction, random=random), time_limit=time_limit,
                               **(environment_kwargs or {}))  # fmt: skip


EXTRA_TASKS: dict[tuple[str, str], Callable[..., control.Environment]] = {
    **{("walker", f"speed_{v}"): functools.partial(_walker, float(v)) for v in WALKER_SPEEDS},
    **{("cheetah", f"speed_{v}"): functools.partial(_cheetah, float(v), 1) for v in CHEETAH_SPEEDS},
    **{("cheetah", f"back_{v}"): functools.partial(_cheetah, float(v), -1) for v in CHEETAH_SPEEDS},
}
ALL_TASKS: tuple[tuple[str, str], ...] = (*suite.ALL_TASKS, *EXTRA_TASKS)


def load(domain: str, task: str, task_kwargs: dict[str, Any] | None = None) -> control.Environment:
    """A suite task or one of `EXTRA_TASKS`, built with `task_kwargs` (`time_limit`, `random`, ...)."""
    build = EXTRA_TASKS.get((domain, task))
    if build is None:
        return suite.load(domain, task, task_kwargs=task_kwargs)
    return build(**(task_kwargs or {}))
