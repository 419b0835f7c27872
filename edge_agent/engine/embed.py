"""Embeddings for feature-extraction bundles: an onnxruntime session and the bundle's pooling."""

from __future__ import annotations

import numpy as np

from edge_agent.bundle import Bundle
from edge_agent.engine.base import load_tokenizer
from edge_agent.engine.ort import open_session, run_errors


def pool(hidden: np.ndarray, mask: np.ndarray, mode: str, normalize: bool) -> np.ndarray:
    """[batch, seq, dim] hidden states → [batch, dim] by ``mode`` ("mean" over the mask, "cls")."""
    if mode == "cls":
        out = hidden[:, 0]
    else:
        m = mask[..., None].astype(hidden.dtype)
        out = (hidden * m).sum(axis=1) / np.clip(m.sum(axis=1), 1e-9, None)
    if normalize:
        out = out / np.clip(np.linalg.norm(out, axis=-1, keepdims=True), 1e-12, None)
    return out.astype(np.float32)


class EmbeddingEngine:
    def __init__(self, bundle: Bundle, *, providers: list[str], threads: int = 1):
        self.bundle = bundle
        self.tokenizer = load_tokenizer(bundle)
        self.context_length = bundle.context_length
        pooling = bundle.manifest.get("pooling") or {}
        self.mode = pooling.get("mode", "mean")
        self.normalize = bool(pooling.get("normalize", True))
        self.session = open_session(str(bundle.file("model.onnx")), providers=providers,
                                    threads=threads)
        self.input_names = {i.name for i in self.session.get_inputs()}
        self.output_name = self.session.get_outputs()[0].name

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer.encode(text).ids)

    def embed(self, texts: list[str]) -> tuple[np.ndarray, int]:
        """One vector per text, and the number of tokens read."""
        encodings = self.tokenizer.encode_batch(texts)
        width = max(len(e.ids) for e in encodings)
        ids = np.zeros((len(texts), width), dtype=np.int64)
        mask = np.zeros_like(ids)
        for row, enc in enumerate(encodings):
            ids[row, : len(enc.ids)] = enc.ids
            mask[row, : len(enc.ids)] = 1
        feed = {"input_ids": ids, "attention_mask": mask}
        if "token_type_ids" in self.input_names:
            feed["token_type_ids"] = np.zeros_like(ids)
        feed = {k: v for k, v in feed.items() if k in self.input_names}
        with run_errors():
            (hidden,) = self.session.run([self.output_name], feed)
        if hidden.ndim == 2:  # the graph pools already (sentence_embedding)
            vectors = hidden.astype(np.float32)
            if self.normalize:
                vectors /= np.clip(np.linalg.norm(vectors, axis=-1, keepdims=True), 1e-12, None)
        else:
            vectors = pool(hidden, mask, self.mode, self.normalize)
        return vectors, int(mask.sum())

    def close(self) -> None:
        self.session = None
