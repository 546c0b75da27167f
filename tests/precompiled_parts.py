"""The step-cache parts `test_warm_start.py::test_step_cache_parts_are_saved_and_loaded_without_tracing` saves,
and the loader it runs in a new process: `python -m tests.precompiled_parts MODEL_FOLDER SETTINGS_JSON FILE...`
rebuilds the step cache on the same folder, loads each saved part with its inputs and expected output, and
prints the largest difference and the frames Dynamo traced (JSON)."""

import json
import sys

import torch
from diffusers import DiffusionPipeline

from diffjet import StepCache
from diffjet.compiler.step_cache import StepCachedTransformer, StepCachedUNet


def step_cached(folder: str, settings: StepCache, graph):
    """The pipeline at `folder` with a step cache whose parts go through `graph(name, part, saveable)`."""
    pipe = DiffusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    model = getattr(pipe, "transformer", None) or pipe.unet
    cls = StepCachedTransformer if model is getattr(pipe, "transformer", None) else StepCachedUNet
    return pipe, model, cls(model, settings, graph=graph)


def recorded_parts(folder: str, settings: StepCache):
    """Four steps of the pipeline at `folder` with a step cache, recording what each part was first called
    with: the pipeline, its denoiser and `{part name: (saveable function, args, kwargs)}`."""
    from diffjet.compiler import calls

    seen = {}

    def graph(name, part, saveable):
        def run(*args, **kwargs):
            seen.setdefault(name, (saveable, args, kwargs))
            return part(*args, **kwargs)
        return run

    pipe, denoiser, step_cache = step_cached(folder, settings, graph)
    denoiser.forward = step_cache
    calls.serialize(pipe)
    calls.add_hook(pipe, step_cache)
    pipe("a red fox in the snow", num_inference_steps=4, height=64, width=64, output_type="latent")
    return pipe, denoiser, seen


def main(folder: str, settings: str, *files: str) -> None:
    from torch._dynamo.utils import counters

    from diffjet.runtime.precompiled import Precompiler

    saveables = {}
    _, model, _ = step_cached(folder, StepCache(**json.loads(settings)),
                              lambda name, part, saveable: saveables.setdefault(name, saveable))
    worst = 0.0
    for file in files:
        saved = torch.load(file, weights_only=False)
        function = Precompiler(model, function=saveables[saved["name"]]).load(saved["data"])
        with torch.no_grad():
            out = function(*saved["args"], **saved["kwargs"])
        for got, want in zip(torch.utils._pytree.tree_leaves(out), torch.utils._pytree.tree_leaves(saved["expected"])):
            if isinstance(want, torch.Tensor):
                worst = max(worst, (got - want).abs().max().item())
    print(json.dumps({"error": worst, "dynamo_frames": sum(counters["frames"].values())}))


if __name__ == "__main__":
    main(*sys.argv[1:])
