"""A deterministic ControlNet conditioning image: Canny-like edges of a synthetic picture.

A ControlNet's speed does not depend on what its control image shows, but tests and benchmarks need one of
the output size that looks like what users feed a canny ControlNet: thin white edges on black, RGB.
The picture is a handful of filled shapes drawn with PIL; its edges are where a central-difference gradient
magnitude passes a threshold, which is Canny without the smoothing and hysteresis, and needs no OpenCV.
"""

import numpy as np
from PIL import Image, ImageDraw

# Gradient magnitude (0-255 grey levels, central differences) above which a pixel is an edge; shapes differ
# from their surroundings by at least one grey step of 32, so every visible outline passes it.
_EDGE_THRESHOLD = 24.0
_GREY_STEPS = np.arange(16, 256, 32)


def control_image(height: int, width: int, seed: int = 0) -> Image.Image:
    """A `width`×`height` RGB edge map of random shapes; the same arguments give the same pixels."""
    rng = np.random.default_rng(seed)
    background = int(rng.choice(_GREY_STEPS))
    picture = Image.new("L", (width, height), background)
    draw = ImageDraw.Draw(picture)
    for _ in range(6):
        fill = int(rng.choice(_GREY_STEPS[_GREY_STEPS != background]))
        x0, x1 = sorted(int(x) for x in rng.integers(0, width, 2))
        y0, y1 = sorted(int(y) for y in rng.integers(0, height, 2))
        box = (x0, y0, max(x1, x0 + 3), max(y1, y0 + 3))
        match int(rng.integers(0, 3)):
            case 0:
                draw.ellipse(box, fill=fill)
            case 1:
                draw.rectangle(box, fill=fill)
            case _:
                corners = [(int(rng.integers(0, width)), int(rng.integers(0, height))) for _ in range(3)]
                draw.polygon(corners, fill=fill)
    pixels = np.pad(np.asarray(picture, dtype=np.float32), 1, mode="edge")
    gradient_x = pixels[1:-1, 2:] - pixels[1:-1, :-2]
    gradient_y = pixels[2:, 1:-1] - pixels[:-2, 1:-1]
    edges = np.where(np.hypot(gradient_x, gradient_y) > _EDGE_THRESHOLD, 255, 0).astype(np.uint8)
    return Image.fromarray(np.repeat(edges[:, :, None], 3, axis=2))


def control_inputs(pipe, height: int | None, width: int | None) -> dict:
    """The extra call arguments a ControlNet pipeline needs (`image`, one per net); {} for others.

    Without a size, the pipeline's default output size (its UNet's sample size times the VAE's factor).
    """
    controlnet = getattr(pipe, "controlnet", None)
    if controlnet is None:
        return {}
    default = pipe.unet.config.sample_size * pipe.vae_scale_factor
    image = control_image(height or default, width or default)
    nets = getattr(controlnet, "nets", None)
    return {"image": [image] * len(nets) if nets is not None else image}
