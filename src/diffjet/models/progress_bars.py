"""Silence the progress bars that diffusers and transformers draw while saving and loading.

diffjet is a library and never writes to the terminal on its own; these libraries switch their bars
with module-global flags, so the switch is scoped to one call and the caller's setting comes back.
"""

import contextlib
from collections.abc import Iterator

import diffusers
import huggingface_hub
import transformers


@contextlib.contextmanager
def hidden_progress_bars() -> Iterator[None]:
    """Within the block, diffusers, transformers and huggingface_hub draw no progress bars."""
    diffusers_enabled = diffusers.utils.logging.is_progress_bar_enabled()
    transformers_enabled = transformers.utils.logging.is_progress_bar_enabled()
    hub_disabled = huggingface_hub.utils.are_progress_bars_disabled()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()  # also turns off huggingface_hub's bars
    try:
        yield
    finally:
        if diffusers_enabled:
            diffusers.utils.logging.enable_progress_bar()
        if transformers_enabled:
            transformers.utils.logging.enable_progress_bar()
        if hub_disabled:
            huggingface_hub.utils.disable_progress_bars()
        else:
            huggingface_hub.utils.enable_progress_bars()
