"""lm-evaluation-harness task files shipped with longexposure (read through lm-eval's TaskManager `include_path`).

Each YAML reads a local JSON/JSONL file (`dataset_path: json`) whose path is filled in per run by
`longexposure evaluate --data TASK=PATH`; no file here names a dataset on the hub. `metrics.py` holds the
functions the YAMLs reference with `!function metrics.NAME` (lm-eval loads it by file path, beside the YAML).
"""

from pathlib import Path

TASK_DIR = Path(__file__).resolve().parent
