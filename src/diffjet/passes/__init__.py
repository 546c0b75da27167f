"""Module-level rewrites. Each pass is `apply(module, config) -> module`: idempotent, runnable on CPU,
and documented with what it changes and when it does not apply."""
