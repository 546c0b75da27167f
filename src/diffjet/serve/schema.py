"""The two request formats the server takes, checked by pydantic, and the one `Generation` both become.

Both formats are strict: a wrong type (a string for a number, a number for a string, `true` for an
integer) or an unknown field is a 422 that names the field, so a typo such as `step` is not silently
ignored. What depends on the server's settings (sizes, step and image limits, LoRA names) is checked
after, by the app, with 400 or 404.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from ..bench.recipes import SCHEDULERS
from ..config import MAX_GUIDANCE, MAX_SEED

MAX_PROMPT_CHARS = 4000
MAX_LORAS = 8
Scheduler = Literal[tuple(SCHEDULERS)]  # type: ignore[valid-type]
#: AUTOMATIC1111's sampler names for the schedulers diffjet has.
A1111_SAMPLERS = {"Euler": "euler", "Euler a": "euler-a", "DPM++ 2M": "dpm++", "DDIM": "ddim", "PNDM": "pndm",
                  "UniPC": "unipc"}
Sampler = Literal[tuple(A1111_SAMPLERS)]  # type: ignore[valid-type]

LoraScale = Annotated[float, Field(ge=-4, le=4, allow_inf_nan=False)]


@dataclass(frozen=True)
class Generation:
    """What to generate, whichever API asked: `n` images, seeds `seed`, `seed + 1`, ...

    `width`, `height` and `steps` are None where the request left them to the server's defaults."""

    prompt: str
    negative_prompt: str
    n: int
    width: int | None
    height: int | None
    steps: int | None
    guidance: float | None  # None: the pipeline's own default
    scheduler: str
    loras: dict[str, float]
    seed: int

    @property
    def seeds(self) -> list[int]:
        """One seed per image: the request's seed plus the image's index, wrapping past `MAX_SEED`."""
        return [(self.seed + i) % (MAX_SEED + 1) for i in range(self.n)]


def random_seed() -> int:
    return secrets.randbelow(2**63)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class OpenAIImageRequest(_Strict):
    """`POST /v1/images/generations`: OpenAI's fields, with diffusion's settings as extra fields."""

    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    n: int = Field(1, ge=1)
    size: str | None = Field(None, pattern=r"^[0-9]{1,5}x[0-9]{1,5}$", description="WIDTHxHEIGHT")
    response_format: Literal["b64_json"] = "b64_json"
    model: str | None = None
    user: str | None = Field(None, max_length=256)
    negative_prompt: str | None = Field(None, max_length=MAX_PROMPT_CHARS)
    steps: int | None = Field(None, ge=1)
    guidance_scale: float | None = Field(None, ge=0, le=MAX_GUIDANCE, allow_inf_nan=False,
                                         description="default: the model's own")
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    scheduler: Scheduler = "default"
    lora: dict[str, LoraScale] = Field(default_factory=dict, max_length=MAX_LORAS)

    def generation(self) -> Generation:
        width, height = (int(v) for v in self.size.split("x")) if self.size else (None, None)
        return Generation(self.prompt, self.negative_prompt or "", self.n, width, height, self.steps,
                          self.guidance_scale, self.scheduler, dict(self.lora),
                          random_seed() if self.seed is None else self.seed)


class A1111Request(_Strict):
    """`POST /sdapi/v1/txt2img`: the AUTOMATIC1111 subset that scripts use."""

    prompt: str = Field("", max_length=MAX_PROMPT_CHARS)
    negative_prompt: str = Field("", max_length=MAX_PROMPT_CHARS)
    steps: int | None = Field(None, ge=1)
    cfg_scale: float | None = Field(None, ge=0, le=MAX_GUIDANCE, allow_inf_nan=False,
                                    description="default: the model's own")
    width: int | None = Field(None, ge=1)
    height: int | None = Field(None, ge=1)
    seed: int = Field(-1, ge=-1, le=MAX_SEED, description="-1: a random seed")
    batch_size: int = Field(1, ge=1)
    sampler_name: Sampler | None = None

    def generation(self) -> Generation:
        scheduler = A1111_SAMPLERS[self.sampler_name] if self.sampler_name else "default"
        return Generation(self.prompt, self.negative_prompt, self.batch_size, self.width, self.height, self.steps,
                          self.cfg_scale, scheduler, {}, random_seed() if self.seed == -1 else self.seed)
