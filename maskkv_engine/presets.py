"""Named presets: engine options plus SamplingParams defaults that reproduce a published setting.

``LLM(model, preset="paper")`` fills every engine option the caller leaves out from the preset, and
``generate`` without SamplingParams uses the preset's (``sampling_params(preset, ...)`` builds them with
overrides). Options given explicitly always win, so a preset is only a starting point.

``paper``: the MaskKV paper's experimental setting (arXiv 2510.09309): MaskKV with budget 256 on top of
dLLM-Cache, prompt refresh every 50 forwards, response refresh every 5, V-verify ratio 0.25, LLaDA
blocks of 8 tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from maskkv_engine.sampling_params import SamplingParams


@dataclass(frozen=True)
class Preset:
    name: str
    engine: dict[str, Any] = field(default_factory=dict)  # LLM / EngineConfig keyword arguments
    sampling: dict[str, Any] = field(default_factory=dict)  # SamplingParams keyword arguments


PRESETS: dict[str, Preset] = {
    "paper": Preset(
        name="paper",
        engine={
            "kv_policy": "maskkv",
            "kv_budget": 256,
            "refresh": "dllm_cache",
            "refresh_config": {"K_p": 50, "K_r": 5, "rho": 0.25},
        },
        sampling={"block_length": 8},
    ),
}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ValueError(f"preset={name!r} is not known (allowed: {sorted(PRESETS)})")
    return PRESETS[name]


def engine_options(name: str | None, given: dict[str, Any]) -> dict[str, Any]:
    """The preset's engine options under the ones ``given`` (None values count as not given)."""
    given = {k: v for k, v in given.items() if v is not None}
    if name is None:
        return given
    preset = get_preset(name)
    return {**{k: (dict(v) if isinstance(v, dict) else v) for k, v in preset.engine.items()}, **given}


def sampling_params(name: str | None = None, **overrides: Any) -> SamplingParams:
    """SamplingParams with the preset's defaults under ``overrides``."""
    base = get_preset(name).sampling if name is not None else {}
    return SamplingParams(**{**base, **overrides})
