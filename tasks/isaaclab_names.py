"""The six Isaac Lab tasks of the paper (DESIGN §7): ids in Isaac Lab 2.x and 3.0, sizes, episode length, family.

Pure Python, so the config layer, tests and error messages can use it without Isaac Lab. Isaac Lab 3.0 dropped
the ``-v0`` suffix and renamed ``Repose-Cube`` to ``Reorient-Cube``; either id is accepted everywhere and
`IsaacLabTask.gym_id` picks the one the installed Isaac Lab registers. ``obs_dim`` / ``act_dim`` are the values
of the paper's (2.x) runs; the running env's own shapes are authoritative (`IsaacLabEnv` warns on a mismatch).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Literal

__all__ = ["API_VERSIONS", "FAMILIES", "IsaacLabTask", "TASKS", "list_isaaclab_tasks", "lookup_isaaclab_task"]

API_VERSIONS = ("2.x", "3.0")
# The task family decides FastTD3's recipe (configs/task/_isaaclab_<family>.yaml; DESIGN §6).
FAMILIES = ("locomotion", "manipulation")


@dataclass(frozen=True)
class IsaacLabTask:
    """One task: ``id_2x`` is the CLI name (`task=<id_2x>`); ``episode_steps`` counts control steps."""

    id_2x: str
    id_3x: str
    obs_dim: int
    act_dim: int
    episode_steps: int
    family: Literal["locomotion", "manipulation"]

    def gym_id(self, api: str) -> str:
        """The gym id the given Isaac Lab API version registers (``"2.x"`` or ``"3.0"``)."""
        if api not in API_VERSIONS:
            raise ValueError(f"Isaac Lab API version {api!r}: allowed {', '.join(API_VERSIONS)}")
        return self.id_2x if api == "2.x" else self.id_3x


TASKS: tuple[IsaacLabTask, ...] = (
    IsaacLabTask("Isaac-Velocity-Flat-H1-v0", "Isaac-Velocity-Flat-H1", 69, 19, 1000, "locomotion"),
    IsaacLabTask("Isaac-Velocity-Flat-G1-v0", "Isaac-Velocity-Flat-G1", 123, 37, 1000, "locomotion"),
    IsaacLabTask("Isaac-Velocity-Rough-H1-v0", "Isaac-Velocity-Rough-H1", 256, 19, 1000, "locomotion"),
    IsaacLabTask("Isaac-Velocity-Rough-G1-v0", "Isaac-Velocity-Rough-G1", 310, 37, 1000, "locomotion"),
    IsaacLabTask("Isaac-Repose-Cube-Allegro-Direct-v0", "Isaac-Reorient-Cube-Allegro-Direct", 124, 16, 300,
                 "manipulation"),  # fmt: skip
    IsaacLabTask("Isaac-Repose-Cube-Shadow-Direct-v0", "Isaac-Reorient-Cube-Shadow-Direct", 157, 20, 600,
                 "manipulation"),  # fmt: skip
)

_BY_ID = {t.id_2x: t for t in TASKS} | {t.id_3x: t for t in TASKS}


def list_isaaclab_tasks() -> list[str]:
    """The CLI names (2.x ids) of the supported tasks."""
    return [t.id_2x for t in TASKS]


def lookup_isaaclab_task(name: str) -> IsaacLabTask:
    """The task with this 2.x or 3.0 id; an unknown id raises `ValueError` naming close matches."""
    task = _BY_ID.get(name) if isinstance(name, str) else None
    if task is not None:
        return task
    close = difflib.get_close_matches(str(name), list(_BY_ID), n=3, cutoff=0.6)
    hint = f"close matches: {', '.join(close)}" if close else f"supported: {', '.join(list_isaaclab_tasks())}"
    raise ValueError(f"unknown Isaac Lab task {name!r} (a 2.x or 3.0 id of DESIGN §7); {hint}")
