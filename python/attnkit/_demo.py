"""`python -m attnkit demo`: static embeddings become contextual ones, as in the lecture notes.

Every word gets a static embedding along a few named meanings (a small hand-written lexicon; other
words get a small fixed vector, so they carry little meaning). Self-attention with no learned
weights (query = key = value = the embeddings, the notes' first step) turns them into contextual
embeddings: each word becomes a weighted mix of the words it resembles. An ALiBi distance bias
(nearby words count more) adds position, so the two "bank"s of the default sentence part ways:
one leans to money, the other to the river.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np

import attnkit

DIMENSIONS = ("finance", "nature", "water", "food", "technology", "people", "motion")
LEXICON: dict[str, dict[str, float]] = {
    "money": {"finance": 1.0}, "cash": {"finance": 1.0}, "loan": {"finance": 0.9, "people": 0.1},
    "deposit": {"finance": 0.9}, "deposited": {"finance": 0.9, "motion": 0.1}, "account": {"finance": 0.8, "technology": 0.2},
    "interest": {"finance": 0.7, "people": 0.2}, "bank": {"finance": 0.6, "nature": 0.45, "water": 0.3},
    "river": {"nature": 0.7, "water": 0.9}, "water": {"water": 1.0, "nature": 0.4}, "lake": {"water": 0.9, "nature": 0.6},
    "flow": {"water": 0.7, "motion": 0.6}, "flows": {"water": 0.7, "motion": 0.6}, "flowing": {"water": 0.7, "motion": 0.6},
    "flood": {"water": 0.9, "nature": 0.5}, "fish": {"nature": 0.6, "water": 0.6, "food": 0.3},
    "tree": {"nature": 1.0}, "trees": {"nature": 1.0}, "grass": {"nature": 0.9}, "muddy": {"nature": 0.6, "water": 0.5},
    "apple": {"food": 0.8, "technology": 0.45}, "fruit": {"food": 1.0}, "ate": {"food": 0.8, "people": 0.3},
    "computer": {"technology": 1.0}, "phone": {"technology": 0.9, "people": 0.2}, "app": {"technology": 0.9},
    "she": {"people": 1.0}, "he": {"people": 1.0}, "i": {"people": 1.0}, "they": {"people": 1.0}, "we": {"people": 1.0},
    "walked": {"motion": 0.8, "people": 0.3}, "walking": {"motion": 0.8, "people": 0.3}, "sat": {"people": 0.4, "motion": 0.2},
    "approved": {"finance": 0.4, "people": 0.4}, "bought": {"finance": 0.6, "people": 0.3}, "new": {"technology": 0.2},
}
DEFAULT = "she deposited cash at the bank and then walked along the river bank"
SLOPE = 0.3  # ALiBi: the score of a word d positions away drops by SLOPE * d


def static_embedding(word: str) -> np.ndarray:
    vec = np.zeros(len(DIMENSIONS), dtype=np.float32)
    for name, value in LEXICON.get(word, {}).items():
        vec[DIMENSIONS.index(name)] = value
    if word not in LEXICON:  # a small, fixed vector: little meaning of its own
        seed = int.from_bytes(hashlib.sha256(word.encode()).digest()[:8], "little")
        vec = (np.random.default_rng(seed).standard_normal(len(DIMENSIONS)) * 0.08).astype(np.float32)
    return vec


def describe(vec: np.ndarray) -> str:
    top = np.argsort(vec)[::-1][:2]
    return ", ".join(f"{DIMENSIONS[d]} {vec[d]:.2f}" for d in top)


def run(sentence: str | None = None, plot: str | None = None) -> int:
    words = [w.strip(".,!?;:").lower() for w in (sentence or DEFAULT).split()]
    words = [w for w in words if w]
    if not words:
        print("demo: the sentence has no words")
        return 2
    static = np.stack([static_embedding(w) for w in words])  # (words, dims)
    x = static[None, None]  # (batch 1, head 1, words, dims)
    contextual, weights = attnkit.scaled_dot_product_attention(
        x, x, x, scale=4.0, alibi_slopes=np.array([SLOPE]), return_weights=True
    )
    contextual, weights = contextual[0, 0], weights[0, 0]
    print(f"sentence: {' '.join(words)}")
    print(f"static embeddings along: {', '.join(DIMENSIONS)}")
    print(f"self-attention with query = key = value, scale 4, ALiBi slope {SLOPE} (nearby words count more)\n")
    width = max(len(w) for w in words)
    print(f"{'word':<{width}}  attends most to")
    for i, word in enumerate(words):
        top = np.argsort(weights[i])[::-1][:3]
        print(f"{word:<{width}}  " + ", ".join(f"{words[j]} {weights[i, j]:.2f}" for j in top))
    print("\nstatic -> contextual (the two strongest meanings):")
    for i, word in enumerate(words):
        if word in LEXICON and sum(v > 0.25 for v in LEXICON[word].values()) > 1:
            print(f"  {word:<{width}} (position {i}): {describe(static[i])}  ->  {describe(contextual[i])}")
    if plot:
        return save_map(weights, words, "word", "self-attention weights", plot)
    return 0


def save_map(weights: np.ndarray, labels: list[str], kind: str, title: str, path: str) -> int:
    """Saves an attention map (queries down, keys across) as an image; 2 without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("\n--plot needs matplotlib, which is not installed (pip install matplotlib)")
        return 2
    n = len(labels)
    fig, ax = plt.subplots(figsize=(1 + 0.6 * n, 1 + 0.6 * n))
    ax.imshow(weights, cmap="viridis")
    ax.set_xticks(range(n), labels, rotation=60, ha="right")
    ax.set_yticks(range(n), labels)
    ax.set_xlabel("attends to (key)")
    ax.set_ylabel(f"{kind} (query)")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"\nsaved the attention map to {path}")
    return 0


# With a real encoder: one word in several sentences.
MODEL_SENTENCES = (
    "She deposited the money at the bank.",
    "The bank approved the loan this morning.",
    "They sat on the grassy bank of the river.",
    "Fish swam near the muddy bank of the lake.",
)


def run_model(encoder: Any, sentence: str | None = None, word: str = "bank", plot: str | None = None,
              layer: int | None = None, head: int = 0) -> int:
    """The lecture notes' story with a real encoder (an ``attnkit.models.BertEncoder``): ``word``'s
    static embedding (its row of the input table) is the same in every sentence; its contextual
    embeddings (the last layer's output at its position) are not: sentences of one meaning
    resemble each other."""
    sentences = [*MODEL_SENTENCES, sentence] if sentence else list(MODEL_SENTENCES)
    tok = encoder.tokenizer
    word_id = tok.token_to_id(word.lower())
    if word_id is None:
        print(f"demo: {word!r} is not one token of this model's vocabulary; choose another --word")
        return 2
    encs = tok.encode_batch(sentences)
    ids = np.array([e.ids for e in encs])
    mask = np.array([e.attention_mask for e in encs])
    where = [list(e.ids).index(word_id) if word_id in e.ids else -1 for e in encs]
    if min(where) < 0:
        missing = sentences[where.index(-1)]
        print(f"demo: {word!r} is not in the sentence {missing!r}")
        return 2
    hidden, weights = encoder.forward(ids, mask, output_attentions=True)
    n_layers = len(weights)
    layer = n_layers - 1 if layer is None else layer
    if not 0 <= layer < n_layers or not 0 <= head < encoder.config.heads:
        print(f"demo: --layer must be in 0..{n_layers - 1} and --head in 0..{encoder.config.heads - 1}")
        return 2
    static = np.stack([encoder.static_embedding(word_id)] * len(sentences))
    contextual = hidden[np.arange(len(sentences)), where]

    def cosines(v: np.ndarray) -> np.ndarray:
        u = v / np.linalg.norm(v, axis=1, keepdims=True)
        sims: np.ndarray = u @ u.T
        return sims

    print(f"{encoder}\n")
    for i, s in enumerate(sentences):
        print(f"  s{i + 1}: {s}")
    print(f"\nthe static embedding of {word!r} (its row of the input table) is the same vector in every sentence:")
    print(f"  cosine between any two: {cosines(static).min():.3f}")
    print(f"its contextual embeddings (last layer, at {word!r}) differ; cosine similarity:")
    sims = cosines(contextual)
    print("       " + "".join(f"{f's{j + 1}':>7}" for j in range(len(sentences))))
    for i in range(len(sentences)):
        print(f"  s{i + 1:<4}" + "".join(f"{sims[i, j]:7.3f}" for j in range(len(sentences))))
    tokens = encs[0].tokens
    w = weights[layer][0, head, where[0], : int(mask[0].sum())]
    top = np.argsort(w)[::-1][:4]
    print(f"\nlayer {layer}, head {head}: in s1, {word!r} attends most to "
          + ", ".join(f"{tokens[j]} {w[j]:.2f}" for j in top))
    if plot:
        n = int(mask[0].sum())
        return save_map(weights[layer][0, head, :n, :n], tokens[:n], "token", f"s1, layer {layer}, head {head}", plot)
    return 0
