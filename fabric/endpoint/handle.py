"""``ModelHandle``: what a user's function gets as its first argument at the site.

``fab.submit(fn, data, model="smollm2-135m")`` runs ``fn(handle, data)`` in a process of its
own next to the site's request worker (``fabric.endpoint.sandbox``). The handle holds no site
secret and no connection to a model server: it holds a capability (an opaque token, see
``fabric.endpoint.capability``) and a ``Channel`` to the worker, which checks the capability
on every request and serves it through a ``ServerSession`` with tickets it signs itself, so a
user function can do no more than its caller could from the SDK, within its limits.
"""

from __future__ import annotations

import functools
import operator
import threading
from collections.abc import Sequence
from typing import Any, Protocol

from fabric.errors import FabricError, InvalidRequest


class Channel(Protocol):
    """How a handle's requests reach the site (the worker behind the capability)."""

    def request_many(self, model: str, version: str | None,
                     requests: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Results of ``requests`` (``InferenceRequest`` dicts) in order, or the first
        one's typed error."""
        ...

    def close(self) -> None:
        """Release the channel."""
        ...


class ModelHandle:
    """Requests to one model's warm server, from inside a user function."""

    def __init__(self, channel: Channel, model: str | None, version: str | None = None, *,
                 identity: str = "") -> None:
        self._channel = channel
        self.model = model
        self.version = version
        self.identity = identity
        self._lock = threading.Lock()

    # -- the user's API -------------------------------------------------------------------

    def generate(self, prompt: str | None = None, *, messages: list[dict[str, str]] | None = None,
                 max_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0,
                 top_k: int = 0, seed: int | None = None, stop: Sequence[str] = (),
                 logprobs: bool = False, hooks: list[dict[str, Any]] | None = None,
                 top_logprobs: int = 0) -> Any:
        """Generate text (a ``GenerationResult`` with ``.text``, ``.token_ids``...);
        ``top_logprobs=k``: each position's k most likely tokens too."""
        from fabric.protocol import GenerationResult

        result = self.request({
            "kind": "generate", "prompt": prompt, "messages": messages,
            "sampling": {"max_tokens": max_tokens, "temperature": temperature, "top_p": top_p,
                         "top_k": top_k, "seed": seed, "stop": list(stop),
                         "logprobs": logprobs or bool(top_logprobs),
                         "top_logprobs": top_logprobs},
            "hooks": hooks or [],
        })
        return GenerationResult.model_validate(result)

    def chat(self, messages: list[dict[str, str]], **kwargs: Any) -> Any:
        """Generate a reply to chat ``messages`` (the model's chat template is applied)."""
        return self.generate(messages=messages, **kwargs)

    def embed(self, texts: str | Sequence[str], *, layer: int = -1, pooling: str = "mean",
              normalize: bool = True) -> Any:
        """Embedding vectors (numpy): ``(dim,)`` for one string, ``(n, dim)`` for a list."""
        from fabric.client.decoding import embeddings_from_results
        from fabric.protocol import MAX_BATCH_TEXTS, renumber_text_error

        single = isinstance(texts, str)
        items = [texts] if isinstance(texts, str) else list(texts)
        results = []
        # One batched request (one message, one array) per MAX_BATCH_TEXTS texts.
        for start in range(0, len(items), MAX_BATCH_TEXTS):
            req = {"kind": "embed", "prompts": items[start:start + MAX_BATCH_TEXTS],
                   "layers": [layer], "pooling": pooling, "normalize": normalize}
            try:
                results.append(self.request(req))
            except FabricError as exc:
                raise renumber_text_error(exc, functools.partial(operator.add, start)) from None
        vectors = embeddings_from_results(results)
        return vectors[0] if single else vectors

    def hidden_states(self, text: str, *, layers: Sequence[int] = (-1,),
                      positions: Sequence[int] | None = None) -> dict[str, Any]:
        """The residual stream after each of ``layers`` (torch tensors)."""
        from fabric.client.decoding import decode_tensors

        return dict(decode_tensors(self.request({
            "kind": "hidden_states", "prompt": text, "layers": list(layers),
            "positions": None if positions is None else list(positions)})))

    def logprobs(self, text: str, continuation: str) -> dict[str, Any]:
        """Log-probability of each token of ``continuation`` given ``text``."""
        from fabric.client.decoding import decode_tensors

        return dict(decode_tensors(self.request({
            "kind": "logprobs", "prompt": text, "continuation": continuation})))

    # -- plumbing -------------------------------------------------------------------------

    def request(self, fields: dict[str, Any]) -> dict[str, Any]:
        """Send one raw request (``InferenceRequest`` fields; model filled in); its result."""
        return self.request_many([fields])[0]

    def request_many(self, many: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Send several requests at once (the server batches them); results in order, or the
        first one's typed error."""
        if self.model is None:
            raise InvalidRequest("this function was submitted with model=None: the handle has "
                                 "no model; pass model=... to fab.submit")
        from fabric.protocol import validate_request

        # Checked here for a prompt error message, and again by the worker (which trusts
        # nothing this process sends).
        reqs = [validate_request({"model": self.model, "version": self.version, **f})
                .model_dump() for f in many]
        with self._lock:
            return self._channel.request_many(str(self.model), self.version, reqs)

    def close(self) -> None:
        """Release the channel to the site."""
        with self._lock:
            self._channel.close()

    def __repr__(self) -> str:
        return f"ModelHandle(model={self.model!r}, version={self.version!r})"


def preload() -> None:
    """Import now what the handle's methods import when first called (the request models,
    the SDK's result decoding): a user function's process does this before its call comes.
    Not numpy or torch, which only embeddings and tensors need."""
    import fabric.client.decoding
    import fabric.protocol  # noqa: F401
