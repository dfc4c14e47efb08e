#!/bin/sh
# kubellm training image entrypoint: seed the writable TORCH_EXTENSIONS_DIR with the CPU DeepSpeed ops
# prebuilt at image build time, then run the command.
#
# torch's extension loader takes a lock file inside the extension directory on every load, so the
# prebuilt ops cannot be used from the read-only image layer directly; a copy (mtimes preserved, so
# ninja sees them as up to date and compiles nothing) into the emptyDir under /tmp is cheap.
# Kubernetes `command:` replaces this entrypoint; pods that set one and run with DS_ACCELERATOR=cpu
# run the same copy first (the CUDA ops are compiled into site-packages and need none of this).
set -eu
if [ -n "${KUBELLM_PREBUILT_TORCH_EXTENSIONS:-}" ] && [ -d "${KUBELLM_PREBUILT_TORCH_EXTENSIONS}" ] \
   && [ -n "${TORCH_EXTENSIONS_DIR:-}" ] && [ ! -e "${TORCH_EXTENSIONS_DIR}/.kubellm-seeded" ]; then
  mkdir -p "${TORCH_EXTENSIONS_DIR}"
  cp -Rp "${KUBELLM_PREBUILT_TORCH_EXTENSIONS}/." "${TORCH_EXTENSIONS_DIR}/"
  : > "${TORCH_EXTENSIONS_DIR}/.kubellm-seeded"
fi
exec "$@"
