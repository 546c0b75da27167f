"""`diffjet serve`: an image service over a compiled pipeline.

    settings.py  what is served (sizes, limits, LoRA folder, API key): one frozen, validated value
    schema.py    the OpenAI and AUTOMATIC1111 request formats, checked strictly, and the one `Generation`
    batcher.py   the queue, cut into batches of images that share size, steps, guidance, scheduler, LoRAs
    worker.py    the one thread that owns the pipeline: load, warm, switch LoRA and scheduler, run batches
    app.py       the FastAPI app (routes, errors, auth, body cap, metrics) around one batcher and worker
    server.py    uvicorn in this process; ray.py  the same app as a Ray Serve deployment, one replica per GPU

Only `settings` is imported here: FastAPI, uvicorn and torch load when a server starts.
"""

from .settings import ServeSettings

__all__ = ["ServeSettings"]
