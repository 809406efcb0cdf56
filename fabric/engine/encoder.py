"""The step executor for embedding models (BERT-style encoders such as all-MiniLM-L6-v2).

Encoders have no KV cache and no pipeline: each step sorts its prompts by length, runs them in
sub-batches of similar length (so little of each batch is padding, as sentence-transformers
does), and pools the last hidden state per request as the request asked (mean over real
tokens, first token, or last token). Single rank only.
"""

from __future__ import annotations

from collections import deque
from pathlib import Path

import torch

from fabric.engine.steps import SeqOutput, SeqWork, StepPlan

SUB_BATCH = 32
"""Prompts per forward call within a step."""


def trained_length(folder: Path) -> int | None:
    """A sentence-transformers model's ``max_seq_length`` (``sentence_bert_config.json``), or
    None. sentence-transformers cuts longer texts there, so a vector of a longer text would
    not be the model's: the server refuses such texts instead (``ContextLengthExceeded``)."""
    import json

    try:
        value = json.loads((folder / "sentence_bert_config.json").read_text())["max_seq_length"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return int(value) if isinstance(value, int) and value > 0 else None


class EncoderExecutor:
    """The ``StepExecutor`` the engine loop drives for an embedding model."""

    def __init__(self, folder: Path, dtype: torch.dtype) -> None:
        from transformers import AutoModel

        self.model = AutoModel.from_pretrained(folder, dtype=dtype).eval()
        self.config = self.model.config
        self.max_tokens = trained_length(folder)
        """The longest text the model embeds as its recipe does (None: its position table)."""
        self.inflight = 0
        self._done: deque[list[SeqOutput]] = deque()

    @property
    def depth(self) -> int:
        """One step at a time."""
        return 1

    @torch.no_grad()
    def launch(self, plan: StepPlan) -> None:
        """Encode the plan's prompts (each whole) and pool them."""
        self.inflight += 1
        by_length = sorted(plan.seqs, key=lambda s: s.n)
        pooled: dict[str, SeqOutput] = {}
        for i in range(0, len(by_length), SUB_BATCH):
            for out in self._encode(by_length[i:i + SUB_BATCH]):
                pooled[out.seq_id] = out
        self._done.append([pooled[s.seq_id] for s in plan.seqs])

    def _encode(self, seqs: list[SeqWork]) -> list[SeqOutput]:
        width = max(s.n for s in seqs)
        pad = self.config.pad_token_id or 0
        ids = torch.tensor([s.token_ids + [pad] * (width - s.n) for s in seqs])
        mask = torch.tensor([[1] * s.n + [0] * (width - s.n) for s in seqs])
        hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state.float()
        outputs = []
        n_layers = self.config.num_hidden_layers
        for i, s in enumerate(seqs):
            rows = hidden[i, : s.n]
            mode = s.capture.mode if s.capture is not None else "mean"
            value = {"mean": (rows.sum(0), s.n), "first": rows[0], "last": rows[-1]}.get(
                mode, (rows.sum(0), s.n))
            outputs.append(SeqOutput(s.seq_id, captures={n_layers: value}))
        return outputs

    def collect(self) -> list[SeqOutput]:
        """Outputs of the oldest step."""
        self.inflight -= 1
        return self._done.popleft()

    def shutdown(self) -> None:
        """Nothing to stop: single rank."""
