"""Classifier-free guidance for affine flow blocks, both families: the rules that combine the two branches'
predictions, their options, and the guidance a sampler applies.

With guidance, a block's transformer runs the conditional and the unconditional branch as one batch ([cond; uncond]
rows, one shared trajectory x), and a rule combines their predictions (a, b) of each token's log-scale and shift:

- `"extrapolate"` (TarFlow's): cond + w * (cond - uncond) on the log-scale, the shift, or both (`target`);
- `"gaussian_product"` (STARFlow's): the Gaussian p_c^(1+w) / p_u^w of the two branches' predictions N(b, exp(a)^2).

w = guidance_scale - 1 (the diffusers convention: 1.0 is no guidance; Apple's `--cfg g` is `guidance_scale = 1 + g`).
A `GuidanceRule` names the rule and its options: `target`, the `schedule` ("linear": Apple's annealed guidance, the
weight growing with the token index) and `unconditional_temperature` (the unconditional branch's attention logits
divided by it: Apple's TarFlow `attn_temp`, how an unconditional model guides against itself). Pipelines and models
take a rule or its name (`guidance_rule="extrapolate"`); the command line takes `NAME[:key=value,...]`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any, Literal

import torch

GuidanceTarget = Literal["both", "scale", "shift"]
GuidanceSchedule = Literal["constant", "linear"]
GUIDANCE_TARGETS = ("both", "scale", "shift")
GUIDANCE_SCHEDULES = ("constant", "linear")
# A branch's prediction for some tokens: (log-scale a, shift b); a guidance weight: one number, or one per row.
Prediction = tuple[torch.Tensor, torch.Tensor]
Weight = torch.Tensor | float


def extrapolate(cond: Prediction, uncond: Prediction, weight: Weight, target: GuidanceTarget = "both") -> Prediction:
    """TarFlow's rule: cond + w * (cond - uncond) on the log-scale, the shift, or both."""
    (a_cond, b_cond), (a_uncond, b_uncond) = cond, uncond
    if target in ("both", "scale"):
        a_cond = a_cond + weight * (a_cond - a_uncond)
    if target in ("both", "shift"):
        b_cond = b_cond + weight * (b_cond - b_uncond)
    return a_cond, b_cond


def gaussian_product(
    cond: Prediction, uncond: Prediction, weight: Weight, target: GuidanceTarget = "both"
) -> Prediction:
    """STARFlow's rule: the Gaussian p_c^(1+w) / p_u^w of the two branches' predictions N(b, exp(a)^2), with the
    variance ratio s = min(sigma_c / sigma_u, 1)^2 clipped so that the result's variance stays positive."""
    (a_cond, b_cond), (a_uncond, b_uncond) = cond, uncond
    ratio = (2 * torch.clamp(a_cond - a_uncond, max=0.0)).exp()
    denominator = 1 + weight - weight * ratio
    log_scale = a_cond - 0.5 * denominator.log()
    shift = ((1 + weight) * b_cond - weight * ratio * b_uncond) / denominator
    return log_scale, shift


GUIDANCE_RULES: dict[str, Callable[[Prediction, Prediction, Weight, GuidanceTarget], Prediction]] = {
    "extrapolate": extrapolate,
    "gaussian_product": gaussian_product,
}


def check_positive_number(name: str, value: Any) -> float:
    """`value` as a float when it is a finite number > 0 (not a bool), else a one-line `ValueError` naming `name`."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < math.inf:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class GuidanceRule:
    """How the guidance branches combine: the rule's `name` ("extrapolate" or "gaussian_product"), what it guides
    (`target`, extrapolation only: "both", "scale" or "shift"), how the weight varies over the tokens (`schedule`:
    "constant", or "linear": w * (t + 1) / (T - 1) at token t, Apple's annealed guidance) and the attention
    temperature of the unconditional branch (`unconditional_temperature`, Apple's TarFlow `attn_temp`)."""

    name: str = "extrapolate"
    target: GuidanceTarget = "both"
    schedule: GuidanceSchedule = "constant"
    unconditional_temperature: float = 1.0

    def __post_init__(self) -> None:
        if self.name not in GUIDANCE_RULES:
            raise ValueError(f"guidance_rule must be one of {tuple(GUIDANCE_RULES)}, got {self.name!r}")
        if self.target not in GUIDANCE_TARGETS:
            raise ValueError(f"the guidance rule's target must be one of {GUIDANCE_TARGETS}, got {self.target!r}")
        if self.schedule not in GUIDANCE_SCHEDULES:
            raise ValueError(f"the guidance rule's schedule must be one of {GUIDANCE_SCHEDULES}, got {self.schedule!r}")
        temperature = check_positive_number("unconditional_temperature", self.unconditional_temperature)
        object.__setattr__(self, "unconditional_temperature", temperature)
        if self.name == "gaussian_product" and self.target != "both":
            raise ValueError("a guidance target applies to the 'extrapolate' rule only; 'gaussian_product' guides both")

    @classmethod
    def parse(cls, rule: GuidanceRule | str | None, default: str = "extrapolate") -> GuidanceRule:
        """A rule from a rule, a name, `NAME:key=value,...` (the command line's form), or None (`default`)."""
        if isinstance(rule, GuidanceRule):
            return rule
        if rule is None:
            return cls(default)
        if not isinstance(rule, str):
            raise ValueError(f"guidance_rule must be a rule name or a GuidanceRule, got {type(rule).__name__}")
        name, options = parse_spec(rule, {field.name for field in fields(cls)} - {"name"}, "guidance rule")
        return cls(name, **options)

    def to_spec(self) -> str:
        """The `NAME:key=value,...` form of this rule (only the options that differ from their defaults)."""
        options = [f"{f.name}={getattr(self, f.name)}" for f in fields(self)[1:] if getattr(self, f.name) != f.default]
        return self.name + (":" + ",".join(options) if options else "")


def parse_spec(spec: str, allowed: set[str], what: str) -> tuple[str, dict[str, Any]]:
    """`NAME[:key=value,...]` -> (NAME, {key: value}), values read as int, float, None, true/false or text; unknown
    keys are a `ValueError` listing `allowed`."""
    name, _, rest = spec.strip().partition(":")
    options: dict[str, Any] = {}
    for item in filter(None, (part.strip() for part in rest.split(","))):
        key, equals, text = item.partition("=")
        key = key.strip().replace("-", "_")
        if not equals or key not in allowed:
            known = ", ".join(sorted(allowed)) or "none"
            raise ValueError(f"{what} option {item!r} of {spec!r}: expected key=value with a key among {known}")
        options[key] = _spec_value(text.strip())
    return name.strip(), options


def _spec_value(text: str) -> Any:
    lowered = text.lower()
    if lowered in ("none", "null"):
        return None
    if lowered in ("true", "false"):
        return lowered == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


@dataclass(frozen=True)
class Guidance:
    """The guidance a sampler applies: a scale (diffusers convention; 1.0 is none) and a rule."""

    scale: float = 1.0
    rule: GuidanceRule = GuidanceRule()

    def __post_init__(self) -> None:
        if isinstance(self.scale, bool) or not isinstance(self.scale, int | float) or not math.isfinite(self.scale):
            raise ValueError(f"guidance_scale must be a finite number, got {self.scale!r}")
        if self.rule.name == "gaussian_product" and self.scale < 1:
            raise ValueError(f"guidance_rule='gaussian_product' needs guidance_scale >= 1, got {self.scale}")

    @property
    def weight(self) -> float:
        """w = scale - 1, the weight of the difference between the branches (Apple's g)."""
        return self.scale - 1.0

    @property
    def active(self) -> bool:
        """Guidance applies whenever the scale is not 1 (below 1 too: that pushes away from the condition)."""
        return self.scale != 1.0

    def branch_temperatures(self, attention_temperature: float) -> tuple[float, ...]:
        """The attention temperature of each branch's rows: (conditional, unconditional), or one branch unguided."""
        if not self.active:
            return (attention_temperature,)
        return (attention_temperature, attention_temperature * self.rule.unconditional_temperature)


def tarflow_guidance_from_apple(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Apple's ml-tarflow `Model.reverse` sampling keywords as `TarFlowModel.inverse` / `TarFlowPipeline` arguments:
    `guidance` g is guidance_scale = 1 + g; `guide_what` ("ab", "a", "b") the rule's target, `annealed_guidance` the
    linear schedule, `attn_temp` the unconditional branch's attention temperature."""
    rule = GuidanceRule(
        "extrapolate",
        target={"ab": "both", "a": "scale", "b": "shift"}[kwargs.get("guide_what", "ab")],
        schedule="linear" if kwargs.get("annealed_guidance") else "constant",
        unconditional_temperature=kwargs.get("attn_temp", 1.0),
    )
    return {"guidance_scale": 1.0 + kwargs.get("guidance", 0.0), "guidance_rule": rule}


def row_weights(guidance: Guidance | None, num_rows: int, device: torch.device) -> torch.Tensor | float:
    """The guidance weight of each transformer row: a number, or (1, rows, 1) for the linear schedule, where row t
    (which predicts token t + 1) gets w * (t + 1) / rows."""
    if guidance is None or not guidance.active:
        return 0.0
    if guidance.rule.schedule == "constant":
        return guidance.weight
    steps = torch.arange(1, num_rows + 1, device=device, dtype=torch.float32)
    return (guidance.weight * steps / max(num_rows, 1)).view(1, -1, 1)


def guide(
    guidance: Guidance | None, log_scale: torch.Tensor, shift: torch.Tensor, weight: torch.Tensor | float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine [cond; uncond] rows of (a, b) into B guided rows with the guidance's rule (unguided: as given).

    Under autocast the rule runs in the projection's dtype, as Apple's bf16 sampling does (so its samples are
    reproduced); a model whose weights are half precision gets the rule in float32 (Apple has no such mode, and the
    rule's differences of nearby values are where half precision loses most)."""
    if guidance is None or not guidance.active:
        return log_scale, shift
    if not torch.is_autocast_enabled(log_scale.device.type) and log_scale.dtype.itemsize < 4:
        log_scale, shift = log_scale.float(), shift.float()
    if isinstance(weight, torch.Tensor):
        weight = weight.to(log_scale.dtype)
    a_cond, a_uncond = log_scale.chunk(2)
    b_cond, b_uncond = shift.chunk(2)
    rule = guidance.rule
    return GUIDANCE_RULES[rule.name]((a_cond, b_cond), (a_uncond, b_uncond), weight, rule.target)


__all__ = [
    "GUIDANCE_RULES",
    "GUIDANCE_SCHEDULES",
    "GUIDANCE_TARGETS",
    "Guidance",
    "GuidanceRule",
    "check_positive_number",
    "extrapolate",
    "gaussian_product",
    "guide",
    "parse_spec",
    "row_weights",
    "tarflow_guidance_from_apple",
]
