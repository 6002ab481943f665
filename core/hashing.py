"""sha256 as every record spells it: lowercase hex digests of files and keys."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

SHA256 = re.compile(r"[0-9a-f]{64}")


def sha256_file(path: Path) -> str:
    """The sha256 hex digest of a file's bytes."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()
