"""What a plugin's ModelRunner may use: the public types of one engine step.

A backend registers ``factory(engine_config, model_config, dtype, max_model_len, device) -> ModelRunner`` in
the entry-point group ``maskkv_engine.model_runners`` and imports only from here and from ``maskkv_engine``.
"""

from maskkv_engine.config import EngineConfig, SchedulerConfig
from maskkv_engine.engine.runner_protocol import ENTRY_POINT_GROUP, ModelRunner, StepResult
from maskkv_engine.engine.scheduler import ScheduledRequest
from maskkv_engine.models.config import DiffusionLMConfig
from maskkv_engine.sampling.guidance import guided_logits, unconditional_tokens

__all__ = [
    "ENTRY_POINT_GROUP",
    "DiffusionLMConfig",
    "EngineConfig",
    "ModelRunner",
    "ScheduledRequest",
    "SchedulerConfig",
    "StepResult",
    "guided_logits",
    "unconditional_tokens",
]
