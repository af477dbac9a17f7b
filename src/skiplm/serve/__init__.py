"""`skiplm serve`: an OpenAI-compatible HTTP server with the model and its speculative draft kept warm.

:func:`build` gets a model ready (:class:`ServedModel`: the decoder — :class:`~skiplm.speculative.SpeculativeDecoder`,
or plain decoding — and the scheduler that batches concurrent requests through it, :mod:`.batcher`);
:func:`~skiplm.serve.app.create_app` makes the FastAPI app, :func:`~skiplm.serve.app.run_server` runs it with uvicorn
(both need the ``serve`` extra: ``pip install 'skiplm[serve]'``). The requests and the errors: :mod:`.protocol`.

Why not ``transformers serve``: it runs ``model.generate()`` one request at a time on its own thread (or transformers'
continuous batching with paged attention, which does not go through a custom decoder), so it neither batches
concurrent requests through skiplm's decoder nor gives it a way to stop one row; this is a thin app of our own.
"""

from .batcher import Batcher, Job, ServeStats
from .engine import DEFAULT_MAX_BATCH, DEFAULT_MAX_TOKENS, ServedModel, build
from .plain import PlainDecoder

__all__ = ["Batcher", "DEFAULT_MAX_BATCH", "DEFAULT_MAX_TOKENS", "Job", "PlainDecoder", "ServeStats", "ServedModel",
           "build"]
