"""Single-device model code: dense and mixture-of-experts decoder LMs. No networking imports.

- ``config``: ``ModelConfig``, the ``PRESETS`` zoo, analytic parameter counts.
- ``layers``: RMSNorm, RoPE, causal self-attention, SwiGLU.
- ``moe``: top-k router, MoE layer, aux losses, expert naming/freezing helpers.
- ``transformer``: ``LanguageModel`` and ``ModelOutput``.
- ``stages``: ``split_stages`` into parameter-sharing pipeline stages; ``build_stage`` holds one alone.
- ``generate``: sampling.

See docs/models.md.
"""

from models.config import PRESETS, ModelConfig, count_active_parameters, count_parameters, get_preset
from models.generate import generate
from models.moe import (
    dense_parameter_names,
    expert_parameters,
    expert_prefix,
    freeze_experts,
    is_expert_parameter,
    load_balancing_loss,
    route,
    router_z_loss,
)
from models.stages import Stage, build_stage, split_stages
from models.transformer import IGNORE_INDEX, LanguageModel, ModelOutput, build_model

__all__ = [
    "IGNORE_INDEX",
    "PRESETS",
    "LanguageModel",
    "ModelConfig",
    "ModelOutput",
    "Stage",
    "build_model",
    "build_stage",
    "count_active_parameters",
    "count_parameters",
    "dense_parameter_names",
    "expert_parameters",
    "expert_prefix",
    "freeze_experts",
    "generate",
    "get_preset",
    "is_expert_parameter",
    "load_balancing_loss",
    "route",
    "router_z_loss",
    "split_stages",
]
