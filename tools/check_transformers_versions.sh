#!/usr/bin/env bash
# Load a converted folder through its remote code with another transformers version (default 4.46.3),
# in a separate virtualenv without smile_stream, and compare logits and greedy tokens with this one.
#   tools/check_transformers_versions.sh [FOLDER] [VERSION]     (FOLDER defaults to the demo output)
set -euo pipefail
cd "$(dirname "$0")/.."
folder=${1:-build/demo/smile}
version=${2:-4.46.3}
venv=build/transformers-$version
[ -d "$folder" ] || { echo "no $folder: run 'make demo' first or pass a converted folder"; exit 2; }
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q torch==2.13.0
  "$venv/bin/pip" install -q "transformers==$version" "huggingface_hub<1.0" accelerate
fi
probe=$(mktemp -d)
cat > "$probe/load.py" <<'PY'
import sys, torch, transformers
sys.modules["smile_stream"] = None  # the remote code must not need the package
model = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True, device_map="auto")
ids = torch.randint(3, 300, (2, 6), generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    result = {"logits": model(ids).logits, "tokens": model.generate(ids[:1], max_new_tokens=8, do_sample=False, pad_token_id=0)}
torch.save(result, sys.argv[2])
print(f"transformers {transformers.__version__}: loaded {type(model).__name__}")
PY
HF_HOME="$probe/a" "$venv/bin/python" "$probe/load.py" "$folder" "$probe/other.pt"
HF_HOME="$probe/b" .venv/bin/python "$probe/load.py" "$folder" "$probe/this.pt"
.venv/bin/python - "$probe" <<'PY'
import sys, torch
a, b = (torch.load(f"{sys.argv[1]}/{n}.pt") for n in ("other", "this"))
diff = (a["logits"] - b["logits"]).abs().max().item()
same = torch.equal(a["tokens"], b["tokens"])
print(f"max logit difference {diff:.3g}, greedy tokens identical: {same}")
sys.exit(0 if diff < 1e-4 and same else 1)
PY
rm -rf "$probe"
