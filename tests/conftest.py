import atexit
import hashlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
# The architecture cache of this test session (tests and the CLI subprocesses they start), not the user's
os.environ["SMILE_STREAM_CACHE"] = tempfile.mkdtemp(prefix="smile-stream-cache-")
atexit.register(shutil.rmtree, os.environ["SMILE_STREAM_CACHE"], ignore_errors=True)
sys.path.insert(0, str(Path(__file__).parent))
# tools/synthetic.py makes the tiny models, adapters and full experts the tests convert
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))

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
    """Builds tiny models on first use and caches them for the session: models(key, **kwargs) -> folder.
    `key` is "family" (a base) or "family:name" (an expert of it: "lora..." or full)."""
    import synthetic

    root = tmp_path_factory.mktemp("models")
    cache = {}
    recipes = {
        "llama": lambda p: synthetic.make_base(p, "llama", seed=10),
        "mistral": lambda p: synthetic.make_base(p, "mistral", seed=11),
        "qwen2": lambda p: synthetic.make_base(p, "qwen2", seed=12),
    }

    def get(key: str, **kwargs) -> Path:
        # keyed on every argument: the same name with other arguments is another model
        cache_key = (key, json.dumps(kwargs, sort_keys=True, default=str))
        if cache_key not in cache:
            family, _, kind = key.partition(":")
            path = root / f"{key.replace(':', '_')}-{hashlib.sha256(cache_key[1].encode()).hexdigest()[:8]}"
            if not kind:
                recipes[family](path)
            else:
                base = get(family)
                if kind.startswith("lora"):
                    synthetic.make_lora(path, base, **kwargs)
                else:
                    synthetic.write_full_variant(path, base, **{"rank": 8, "bias_noise": 0.01, **kwargs})
            cache[cache_key] = path
        return cache[cache_key]

    return get


@pytest.fixture()
def refused(tmp_path):
    """refused(base, experts, match, **options): the conversion fails with a SmileError matching
    `match`, leaves the inputs untouched and writes nothing that looks finished (no index, no
    half-written file, no lock left behind)."""
    from edits import digest

    from smile_stream import Options, SmileError, convert

    def check(base, experts, match, **options):
        inputs = [Path(base)] + [Path(p) for _, p in experts if Path(p).exists()]
        before = [digest(p) for p in inputs if p.exists()]
        out = tmp_path / f"out{len(list(tmp_path.glob('out*')))}"
        with pytest.raises(SmileError, match=match) as info:
            convert(str(base), [(n, str(p)) for n, p in experts], out, Options(**{"gate_rank": 4, **options}), quiet=True)
        if out.exists():
            assert not (out / "model.safetensors.index.json").exists()
            assert not list(out.glob("*.partial")) and not (out / "smile-stream.lock").exists()
        assert [digest(p) for p in inputs if p.exists()] == before
        return str(info.value)

    return check


@pytest.fixture()
def llama(models):
    return models("llama")


@pytest.fixture()
def lora(models):
    return models("llama:lora_bad", r=4, targets=["q_proj", "v_proj"], seed=50)


@pytest.fixture()
def full(models):
    return models("llama:full_bad", seed=51)


@pytest.fixture(scope="session", autouse=True)
def _isolated_hf_home(tmp_path_factory):
    # Remote code is copied into HF_MODULES_CACHE; keep it out of the user's cache.
    home = tmp_path_factory.mktemp("hf_home")
    os.environ["HF_HOME"] = str(home)
    os.environ["HF_MODULES_CACHE"] = str(home / "modules")
