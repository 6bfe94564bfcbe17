"""Whether a name is a hub repo id ("owner/name") or a local path: the one test the loaders, the
input checks and the model card share. Imports nothing heavy (`vlm_rl.hub` imports huggingface_hub).

>>> is_hub_id("Qwen/Qwen2.5-VL-3B-Instruct"), is_hub_id("tiny-llava"), is_hub_id("./runs/final")
(True, False, False)
"""

from __future__ import annotations

import re
from pathlib import Path

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
"""owner/name: one slash, word characters, dots and dashes, starting with a letter or digit."""


def is_hub_id(name: str | Path) -> bool:
    """True when `name` reads as a hub repo id and names nothing on disk (a relative path such as
    "runs/final" that exists is a local folder)."""
    name = str(name)
    return bool(HUB_ID.match(name)) and not Path(name).expanduser().exists()
