"""Where the shared real recordings are: ``<repo>/../shared/data`` (as CI lays it out), else the workplace copy."""
import os
from pathlib import Path

_REPO = Path(__file__).resolve().parent.parent
_CANDIDATES = [Path(os.environ["STIMLOOP_SHARED_DATA"])] if os.environ.get("STIMLOOP_SHARED_DATA") else []
_CANDIDATES += [_REPO.parent / "shared" / "data", Path("/work/shared/data")]

SHARED_DATA = next((p for p in _CANDIDATES if (p / "delhi").is_dir()), _CANDIDATES[0])
DELHI = SHARED_DATA / "delhi"
