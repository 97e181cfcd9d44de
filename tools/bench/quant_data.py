"""Calibration and evaluation data for ``tools/bench_quant.py``: one builder per zoo family, the same data
handed to every quantizer.

Calibration and evaluation never share a sample:

* ``digits``: calibration = images of the digits *training* split (the data the CNN was trained on);
  evaluation = the held-out test split with its labels (real top-1 accuracy).
* ``image`` (ResNet- and MobileNet-style CNNs, random weights): natural-image crops of scikit-learn's two
  bundled photos, normalized like ImageNet inputs (one fixed per-channel mean and std for every image, as
  torchvision's preprocessing does); calibration crops ``china.jpg``, evaluation crops ``flower.jpg``. Real
  photographs have the smooth, spatially correlated statistics (and the heavy tails) that activation ranges
  depend on, which random noise lacks. The fixed normalization matters: standardizing each photo by its own
  statistics (this module's first version) stretched the dark flower photo to 4.2 sigma while the
  calibration photo ended at 1.4, so 25 % of the evaluation pixels lay outside any calibrated input range,
  a shift no real pipeline has (pixels are bounded by 0..255, and calibration images cover that range).
* ``text`` (MiniLM, real weights): real English sentences from ``tools/zoo/sentences.txt``, tokenized with
  MiniLM's own tokenizer. The first :data:`EVAL_SENTENCES` lines are the zoo's held-out set (also read by
  ``tests/test_zoo.py``); every line after them is calibration only. Calibration samples are single
  unpadded sentences (lengths differ), evaluation runs padded batches with the attention mask.
* ``random``: any other zoo model, on the zoo's random valid inputs (distinct seeds for the two parts);
  outputs are compared with fp32, there is no task metric.

Each calibration sample is one input dict at batch 1 and is written as one ``.npz`` file in a folder,
the format both graphopt (``--calib DIR``) and a CalibrationDataReader read without conversion.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

#: The zoo's held-out sentences come first in ``sentences.txt``; calibration sentences follow them.
EVAL_SENTENCES = 120
#: Sentences per padded evaluation batch, and in the batch whose latency is measured.
TEXT_BATCH = 8
IMAGE_BATCH = 50
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)  # torchvision's normalization constants
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)
CALIB_PHOTO, EVAL_PHOTO = 0, 1  # indices into sklearn.datasets.load_sample_images(): china.jpg, flower.jpg


@dataclass
class QuantData:
    """What one model is calibrated and judged on.

    ``output``: the model output the metrics read; ``labels``: ground truth for the evaluation samples
    (digits only); ``latency_feeds``: the input whose onnxruntime latency is measured.
    """

    kind: str
    calib: list[dict[str, np.ndarray]]
    eval_batches: list[dict[str, np.ndarray]]
    output: str
    latency_feeds: dict[str, np.ndarray]
    labels: np.ndarray | None = None
    description: str = ""
    counts: dict[str, int] = field(default_factory=dict)


def build_data(name: str, calib_samples: int, eval_samples: int | None = None,
               latency_batch: int | None = None) -> QuantData:
    """Data for zoo model ``name``: ``calib_samples`` calibration samples, at most ``eval_samples``
    evaluation samples (None: all there are; the image and random kinds make 300 and 32), and latency
    measured on the first ``latency_batch`` evaluation samples (None: 1, or :data:`TEXT_BATCH` sentences)."""
    from tools.zoo import MODELS

    model = MODELS[name]
    if model.family == "digits_cnn":
        data = digits_data(calib_samples, eval_samples, latency_batch or 1)
    elif model.family in ("resnet", "mobilenet"):
        data = image_data(model.inputs["images"].shape[-1], calib_samples, eval_samples or 300, latency_batch or 1)
    elif model.family == "minilm":
        data = text_data(calib_samples, eval_samples, latency_batch or TEXT_BATCH)
    else:
        data = random_data(name, calib_samples, eval_samples or 32, latency_batch or 1)
    data.counts = {"calib": len(data.calib), "eval": sum(len(next(iter(b.values()))) for b in data.eval_batches),
                   "latency_batch": len(next(iter(data.latency_feeds.values())))}
    return data


def digits_data(calib_samples: int, eval_samples: int | None, latency_batch: int = 1) -> QuantData:
    from tools.zoo.data import digits_split

    split = digits_split(0)
    train, test, labels = split["train_images"], split["test_images"], split["test_labels"]
    if calib_samples > len(train):
        raise ValueError(f"digits has {len(train)} training images, asked for {calib_samples}")
    test, labels = test[:eval_samples], labels[:eval_samples]
    return QuantData(
        kind="digits",
        calib=[{"images": train[i: i + 1]} for i in range(calib_samples)],
        eval_batches=[{"images": test}],
        output="logits",
        latency_feeds={"images": test[:latency_batch]},
        labels=labels,
        description="scikit-learn digits: calibration from the training split, top-1 on the held-out test split",
    )


def image_data(size: int, calib_samples: int, eval_samples: int, latency_batch: int = 1) -> QuantData:
    held = natural_crops(EVAL_PHOTO, eval_samples, size, seed=2)
    calib = natural_crops(CALIB_PHOTO, calib_samples, size, seed=1)
    return QuantData(
        kind="image",
        calib=[{"images": calib[i: i + 1]} for i in range(calib_samples)],
        eval_batches=[{"images": held[i: i + IMAGE_BATCH]} for i in range(0, eval_samples, IMAGE_BATCH)],
        output="logits",
        latency_feeds={"images": held[:latency_batch]},
        description=f"natural {size}x{size} crops: calibration from china.jpg, evaluation from flower.jpg",
    )


def natural_crops(photo: int, count: int, size: int, seed: int) -> np.ndarray:
    """``count`` random ``size`` x ``size`` crops of a scikit-learn sample photo, (N, 3, size, size) float32.

    Each crop is taken at a random integer scale (1x to 3x, as far as the 427x640 photo allows) by striding,
    mirrored half of the time; pixels are normalized with ImageNet's per-channel mean and std.
    """
    from sklearn.datasets import load_sample_images

    image = load_sample_images().images[photo].astype(np.float32) / 255.0
    image = (image - IMAGENET_MEAN) / IMAGENET_STD
    max_step = min(3, min(image.shape[:2]) // size)
    if max_step < 1:
        raise ValueError(f"crops of {size} pixels do not fit the {image.shape[0]}x{image.shape[1]} sample photo")
    rng = np.random.default_rng(seed)
    out = np.empty((count, 3, size, size), np.float32)
    for i in range(count):
        step = int(rng.integers(1, max_step + 1))
        span = size * step
        y, x = int(rng.integers(0, image.shape[0] - span + 1)), int(rng.integers(0, image.shape[1] - span + 1))
        patch = image[y: y + span: step, x: x + span: step]
        out[i] = (patch[:, ::-1] if rng.random() < 0.5 else patch).transpose(2, 0, 1)
    return out


def text_data(calib_samples: int, eval_samples: int | None, latency_batch: int = TEXT_BATCH) -> QuantData:
    from tools.zoo.data import sentences, tokenize

    texts = sentences()
    held, spare = texts[:EVAL_SENTENCES][:eval_samples], texts[EVAL_SENTENCES:]
    if calib_samples > len(spare):
        raise ValueError(f"sentences.txt has {len(spare)} calibration sentences, asked for {calib_samples}")
    batches = [tokenize(held[i: i + TEXT_BATCH]) for i in range(0, len(held), TEXT_BATCH)]
    return QuantData(
        kind="text",
        calib=[tokenize([text]) for text in spare[:calib_samples]],
        eval_batches=batches,
        output="sentence_embedding",
        latency_feeds=tokenize(held[:latency_batch]),
        description=f"real English sentences, MiniLM's tokenizer; calibration: one unpadded sentence per sample; "
                    f"evaluation: padded batches of {TEXT_BATCH} with the attention mask",
    )


def random_data(name: str, calib_samples: int, eval_samples: int, latency_batch: int = 1) -> QuantData:
    from tools.zoo import MODELS, make_inputs

    model = MODELS[name]
    held = [make_inputs(model, seed=5000 + i) for i in range(eval_samples)]
    return QuantData(
        kind="random",
        calib=[make_inputs(model, seed=1000 + i) for i in range(calib_samples)],
        eval_batches=held,
        output=next(iter(model.outputs)),
        latency_feeds={k: np.concatenate([h[k] for h in held[:latency_batch]]) for k in held[0]},
        description="the zoo's random valid inputs (no real data for this model)",
    )


def write_calibration(samples: list[dict[str, np.ndarray]], folder: str | Path) -> Path:
    """One ``sample_NNNN.npz`` per calibration sample in ``folder`` (created); returns the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for i, sample in enumerate(samples):
        np.savez(folder / f"sample_{i:04d}.npz", **sample)
    return folder


def read_calibration(folder: str | Path) -> list[dict[str, np.ndarray]]:
    """The samples :func:`write_calibration` wrote, in order."""
    out = []
    for path in sorted(Path(folder).glob("sample_*.npz")):
        with np.load(path) as npz:
            out.append({k: npz[k] for k in npz.files})
    return out
