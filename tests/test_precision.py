"""The `precision` key: auto picks bf16 only where the hardware computes it natively, the choice is printed and
recorded, a resume keeps it, and checkpoints from before the key (algo.amp_bf16) are read in today's terms."""

from __future__ import annotations

import pytest
import torch

from fasttd3_lora import precision
from fasttd3_lora.config import ConfigError, compose_config, upgrade_saved
from fasttd3_lora.fasttd3 import FastTD3Config
from fasttd3_lora.precision import choose_precision, cpu_bf16_flags
from fasttd3_lora.sac import SACConfig

AVX2_ONLY = "processor\t: 0\nflags\t\t: fpu sse sse2 avx avx2 fma\n"
ZEN5 = "processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16 avx512_vnni\n"
SAPPHIRE = "processor\t: 0\nflags\t\t: fpu avx2 avx512f amx_bf16 amx_tile avx512_bf16\n"


def test_native_bf16_is_read_from_the_cpu_flags() -> None:
    assert cpu_bf16_flags(AVX2_ONLY) == []
    assert cpu_bf16_flags(ZEN5) == ["avx512_bf16"]
    assert cpu_bf16_flags(SAPPHIRE) == ["avx512_bf16", "amx_bf16"]
    assert cpu_bf16_flags("") == []


@pytest.mark.parametrize(("cpuinfo", "expected"), [(AVX2_ONLY, "fp32"), (ZEN5, "bf16"), (SAPPHIRE, "bf16")])
def test_auto_on_a_cpu_follows_its_flags(monkeypatch: pytest.MonkeyPatch, cpuinfo: str, expected: str) -> None:
    real = precision.cpu_bf16_flags
    monkeypatch.setattr(precision, "cpu_bf16_flags", lambda: real(cpuinfo))
    chosen, why = choose_precision("auto", "cpu")
    assert chosen == expected and why.startswith("auto: ")


def test_explicit_settings_and_other_devices() -> None:
    assert choose_precision("fp32", "cpu") == ("fp32", "precision=fp32")
    assert choose_precision("bf16", "cpu") == ("bf16", "precision=bf16")
    assert choose_precision("auto", "mps")[0] == "fp32"
    if not torch.cuda.is_available():
        assert choose_precision("auto", "cuda") == ("fp32", "auto: this CUDA device has no bf16")


def test_the_config_maps_precision_to_autocast_and_refuses_other_values() -> None:
    assert SACConfig.from_hydra(compose_config(["precision=bf16"])).amp_bf16 is True
    assert FastTD3Config.from_hydra(compose_config(["algo=fasttd3", "precision=fp32"])).amp_bf16 is False
    auto = SACConfig.from_hydra(compose_config([])).amp_bf16
    assert auto == (choose_precision("auto", "cpu")[0] == "bf16")
    with pytest.raises(ConfigError, match=r"^precision='fp16': allowed one of auto, fp32, bf16$"):
        compose_config(["precision=fp16"])


def test_a_checkpoint_from_before_the_key_reads_as_its_precision() -> None:
    old = {"config": {"seed": 0, "algo": {"name": "fasttd3", "amp_bf16": True}},
           "overrides": ["algo=fasttd3", "algo.amp_bf16=true", "seed=0"], "counters": {}}  # fmt: skip
    new = upgrade_saved(old)
    assert new["config"]["precision"] == "bf16" and "amp_bf16" not in new["config"]["algo"]
    assert new["overrides"] == ["algo=fasttd3", "seed=0", "precision=bf16"]
    assert old["config"]["algo"]["amp_bf16"] is True  # the caller's copy is untouched
    assert upgrade_saved(new) == new  # today's checkpoints pass unchanged
