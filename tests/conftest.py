"""Suite-wide settings: offline HF, and one torch thread (CI has 2 cores; oversubscribed
intra-op threads made small-model tests 10-50x slower there)."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

torch.set_num_threads(1)
