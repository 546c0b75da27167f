"""What a `diffjet serve` process serves and how: one frozen, validated value, built before any model loads."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ConfigError

#: A LoRA's name is its file name in `--lora-dir` without `.safetensors`: letters, digits, `.`, `_`, `-`.
LORA_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


#: The fields that count something, and the `diffjet serve` option that sets each.
_COUNTS = {"max_batch": "--max-batch", "queue": "--queue", "default_steps": "--steps", "max_steps": "--max-steps",
           "max_images": "--max-images", "max_body_bytes": "--max-body-kib", "max_pixels": "--max-pixels"}


@dataclass(frozen=True)
class ServeSettings:
    """Everything a serving process needs; `__post_init__` checks every field (`ConfigError`, one line).

    `model` is what `load_pipeline` takes (a preset, a folder or a hub id) and `model_name` what
    `GET /v1/models` shows. `sizes` are (width, height) pairs, all warmed before `/healthz` says ready; the
    first is a request's default. `max_pixels` caps width × height, also for sizes off the list when
    `allow_new_sizes` admits them.
    """

    model: str
    sizes: tuple[tuple[int, int], ...]
    model_name: str = ""
    device: str = "cpu"
    compiler: str = "diffjet"
    precompile: str = "function"  # `Config.precompile` of a diffjet compiler
    lora_dir: Path | None = None
    lora_base_copy: str = "host"  # `diffjet.load_lora`'s base_copy: where the original weights' copies live
    max_batch: int = 4
    batch_sizes: tuple[int, ...] = ()  # the batch sizes warmed and run; () = every size from 1 to max_batch
    max_wait_ms: float = 20.0
    queue: int = 64
    allow_new_sizes: bool = False
    max_pixels: int = 1536 * 1536
    timeout_s: float = 300.0
    default_steps: int = 30
    max_steps: int = 150
    max_images: int = 10
    max_body_bytes: int = 64 * 1024
    api_key: str | None = field(default=None, repr=False)
    warm_up: bool = True

    def __post_init__(self) -> None:
        if not self.model_name:
            object.__setattr__(self, "model_name", self.model)
        if not self.sizes:
            raise ConfigError("--resolutions: give at least one WIDTHxHEIGHT")
        for width, height in self.sizes:
            check_size(width, height, self.max_pixels, "--resolutions")
        for name, option in _COUNTS.items():
            if getattr(self, name) < 1:
                raise ConfigError(f"{option} must be at least 1, got {getattr(self, name)}")
        if self.batch_sizes and not all(1 <= b <= self.max_batch for b in self.batch_sizes):
            raise ConfigError(f"--batch-sizes must be from 1 to --max-batch ({self.max_batch}), got "
                              f"{','.join(map(str, self.batch_sizes))}")
        if self.default_steps > self.max_steps:
            raise ConfigError(f"--steps ({self.default_steps}) is above --max-steps ({self.max_steps})")
        if not 0 <= self.max_wait_ms <= 10_000:
            raise ConfigError(f"--max-wait-ms must be from 0 to 10000, got {self.max_wait_ms}")
        if not 0 < self.timeout_s < float("inf"):
            raise ConfigError(f"--timeout must be a positive number of seconds, got {self.timeout_s}")
        if self.api_key is not None and not self.api_key:
            raise ConfigError("the API key is empty")
        if self.lora_dir is not None and not Path(self.lora_dir).is_dir():
            raise ConfigError(f"--lora-dir: {self.lora_dir} is not a folder")
        from ..lora import BASE_COPIES  # here: the settings module stays light to import

        if self.lora_base_copy not in BASE_COPIES:
            raise ConfigError(f"--lora-base-copy must be one of {', '.join(BASE_COPIES)}, got {self.lora_base_copy!r}")

    @property
    def warm_batches(self) -> list[int]:
        """The batch sizes the worker warms and the batcher forms (1 always among them)."""
        return sorted(set(self.batch_sizes) | {1}) if self.batch_sizes else list(range(1, self.max_batch + 1))

    @property
    def loras(self) -> dict[str, Path]:
        """The LoRAs a request may name: `<name>.safetensors` files directly in `lora_dir`."""
        if self.lora_dir is None:
            return {}
        files = sorted(Path(self.lora_dir).glob("*.safetensors"))
        return {f.stem: f for f in files if f.is_file() and LORA_NAME.fullmatch(f.stem)}


def check_size(width: int, height: int, max_pixels: int, what: str) -> None:
    """Raise `ConfigError` unless width and height are positive multiples of 8 within `max_pixels`."""
    for name, value in (("width", width), ("height", height)):
        if value < 8 or value % 8:
            raise ConfigError(f"{what}: {name} must be a positive multiple of 8 (the VAE downsamples by 8), got {value}")
    if width * height > max_pixels:
        raise ConfigError(f"{what}: {width}x{height} is {width * height} pixels, above the cap of {max_pixels}")


def is_loopback(host: str) -> bool:
    """Whether binding `host` keeps the server reachable from this machine alone."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def read_api_key(path: str) -> str:
    """The bearer token in `path` (its first line, stripped); `ConfigError` if unreadable or empty."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"--api-key-file: cannot read {path} ({getattr(error, 'strerror', None) or error})") from None
    key = text.strip().splitlines()[0].strip() if text.strip() else ""
    if len(key) < 16:
        raise ConfigError(f"--api-key-file: {path} must hold a key of at least 16 characters on its first line")
    return key
