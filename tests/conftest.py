"""Shared test settings: everything runs offline, single-threaded enough for 2 CPU cores."""

from __future__ import annotations

import os
import tempfile
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# the feature cache of test runs (random tiny encoders) must not pile up in the user's ~/.cache
os.environ["FUSION_ZOO_CACHE"] = tempfile.mkdtemp(prefix="fusion-zoo-test-cache-")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402  (after the environment above is set)

# tiny test models are dominated by thread hand-offs: one thread is several times faster on 2 shared cores
torch.set_num_threads(1)


@pytest.fixture
def raw() -> dict[str, list[Any]]:
    """Three raw samples per modality (PIL images, (waveform, rate) tuples, strings)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (10, 12, 3), dtype=np.uint8)) for _ in range(3)]
    audio = [(rng.standard_normal(80).astype(np.float32), 16000) for _ in range(3)]
    return {"text": ["one", "two two", "three"], "image": images, "audio": audio}
