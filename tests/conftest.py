import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before anything imports huggingface_hub: nothing downloads

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).parent))  # tests/reference.py
