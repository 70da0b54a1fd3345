"""Shared test settings: everything runs offline, single-threaded enough for 2 CPU cores."""

from __future__ import annotations

import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# the feature cache of test runs (random tiny encoders) must not pile up in the user's ~/.cache
os.environ["FUSION_ZOO_CACHE"] = tempfile.mkdtemp(prefix="fusion-zoo-test-cache-")

import torch  # noqa: E402  (after the environment above is set)

# tiny test models are dominated by thread hand-offs: one thread is several times faster on 2 shared cores
torch.set_num_threads(1)
