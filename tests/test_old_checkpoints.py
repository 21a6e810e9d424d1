"""Checkpoints written before the algorithm registry and the adapter layer (commit d18fef6's code, tiny networks,
one LoRA critic each) still resume and export: tests/fixtures/pre_registry/{sac,fasttd3}, finished at env_step
200 with their replay buffers."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from fasttd3_lora.checkpoint import load_checkpoint
from fasttd3_lora.config import compose_config
from fasttd3_lora.export import export_checkpoint
from fasttd3_lora.runner import train
from fasttd3_lora.train import prepare_command_line

FIXTURES = Path(__file__).parent / "fixtures" / "pre_registry"


@pytest.mark.parametrize("algo", ["sac", "fasttd3"])
def test_a_pre_registry_checkpoint_resumes_and_exports(tmp_path: Path, algo: str) -> None:
    run_dir = tmp_path / algo
    shutil.copytree(FIXTURES / algo, run_dir)
    before = load_checkpoint(run_dir / "checkpoints" / "latest.pt")
    assert before["meta"]["counters"]["env_step"] == 200

    command = prepare_command_line([f"resume={run_dir}", "total_env_steps=300"])
    overrides = [o for o in command if not o.startswith("hydra.run.dir=")]
    assert command[-1] == f"hydra.run.dir='{run_dir}'"  # the run continues in its own directory
    cfg = compose_config(overrides)
    counters = train(cfg, run_dir, [o for o in overrides if not o.startswith("resume=")])
    assert counters.env_step == 300 and counters.agent_step > before["meta"]["counters"]["agent_step"]

    after = load_checkpoint(run_dir / "checkpoints" / "latest.pt")
    # the LoRA critic's frozen bases came through the resume untouched, the adapters trained on
    old, new = before["agent"]["critic"], after["agent"]["critic"]
    bases = [k for k in old if k.endswith(".base")]
    assert bases and all(torch.equal(old[k], new[k]) for k in bases)
    assert any(not torch.equal(old[k], new[k]) for k in old if k.endswith(".lora_A"))

    result = export_checkpoint(run_dir)
    assert result.max_abs_diff <= 1e-5
    assert (run_dir / "export" / "policy.onnx").is_file()
