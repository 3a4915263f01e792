"""Keep the garbage collector off the objects that imports made: ``gc.freeze`` once the heavy libraries are in.

torch, megatron, transformers and vLLM leave millions of long-lived objects behind, and every full
collection walks all of them: about 0.2 s each on 2 cores. The learner runs full collections at every
new stage's model (``Trainer.new_model``) and megatron at every distributed-optimizer checkpoint; vLLM
runs five while it starts an engine (about 1.1 s). Frozen objects are never scanned, so those
collections only walk what was made since. Garbage is collected first, so nothing already dead is kept.
Objects made later (models, optimizers, KV caches) stay collectable.
"""

from __future__ import annotations

import atexit
import functools
import gc


@functools.lru_cache(maxsize=None)
def freeze_imported_objects() -> None:
    """Once per process, after its heavy imports and before it builds anything it will drop again. Unfrozen at
    exit, so that the interpreter's last collection still finalises them (extension modules report what it
    does not)."""
    gc.collect()
    gc.freeze()
    atexit.register(gc.unfreeze)
