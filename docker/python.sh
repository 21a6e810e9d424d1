#!/usr/bin/env bash
# The Python that sees Isaac Sim inside an Isaac Lab image, found the way the image itself says:
#   1. $ISAACLAB_PATH/isaaclab.sh -p   (Isaac Lab 2.x and 3.0 images set ISAACLAB_PATH; `-p` runs the
#      interpreter Isaac Lab was installed into: Isaac Sim's python.sh on 2.x, the venv on 3.0)
#   2. $ISAACSIM_ROOT_PATH/python.sh, else /isaac-sim/python.sh (bare Isaac Sim images)
# FASTTD3_PYTHON overrides both (an interpreter path), e.g. for a custom image.
# Installed in the image as /usr/local/bin/fasttd3-python; compose's entrypoints call it.
set -euo pipefail

if [[ -n "${FASTTD3_PYTHON:-}" ]]; then
    exec "${FASTTD3_PYTHON}" "$@"
fi
if [[ -n "${ISAACLAB_PATH:-}" && -x "${ISAACLAB_PATH}/isaaclab.sh" ]]; then
    exec "${ISAACLAB_PATH}/isaaclab.sh" -p "$@"
fi
isaacsim_python="${ISAACSIM_ROOT_PATH:-/isaac-sim}/python.sh"
if [[ -x "${isaacsim_python}" ]]; then
    exec "${isaacsim_python}" "$@"
fi
echo "fasttd3-python: no Isaac Lab / Isaac Sim interpreter found (ISAACLAB_PATH='${ISAACLAB_PATH:-}'," \
    "tried \$ISAACLAB_PATH/isaaclab.sh and ${isaacsim_python}); set FASTTD3_PYTHON to an interpreter" >&2
exit 127
