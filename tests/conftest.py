import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
sys.path.insert(0, str(Path(__file__).parent))

# The reference implementation's outputs, vendored from ../shared/reference (see its README). Named
# here, not globbed: a missing file fails its tests instead of leaving an empty parametrisation.
REFERENCE = Path(__file__).resolve().parent / "data" / "reference"
REFERENCE_CASES = ["c1_e3_nobias_top1", "c2_e3_bias_top2", "c3_e4_bias_topall", "c4_e2_fullrank", "c5_e1_single"]


def reference_file(case: str) -> Path:
    path = REFERENCE / f"{case}.safetensors"
    assert path.is_file(), f"reference vectors missing: {path} (tests/data/reference is part of the repository)"
    return path


@pytest.fixture(scope="session")
def models(tmp_path_factory):
    """Builds tiny models on first use and caches them for the session: models(key) -> folder."""
    from smile_stream import synthetic

    root = tmp_path_factory.mktemp("models")
    cache = {}
    recipes = {
        "llama": lambda p: synthetic.make_base(p, "llama", seed=10),
        "mistral": lambda p: synthetic.make_base(p, "mistral", seed=11),
        "qwen2": lambda p: synthetic.make_base(p, "qwen2", seed=12),
    }

    def get(key: str, **kwargs) -> Path:
        if key not in cache:
            family, _, kind = key.partition(":")
            path = root / key.replace(":", "_")
            if not kind:
                recipes[family](path)
            else:
                base = get(family)
                if kind.startswith("lora"):
                    synthetic.make_lora(path, base, **kwargs)
                else:
                    synthetic.write_full_variant(path, base, **{"rank": 8, "bias_noise": 0.01, **kwargs})

            cache[key] = path
        return cache[key]

    return get


@pytest.fixture(scope="session", autouse=True)
def _isolated_hf_home(tmp_path_factory):
    # Remote code is copied into HF_MODULES_CACHE; keep it out of the user's cache.
    home = tmp_path_factory.mktemp("hf_home")
    os.environ["HF_HOME"] = str(home)
    os.environ["HF_MODULES_CACHE"] = str(home / "modules")
