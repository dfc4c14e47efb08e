#!/bin/sh
# kubellm training image ENTRYPOINT: seed the writable TORCH_EXTENSIONS_DIR with the CPU DeepSpeed op
# prebuilt at image build time, then run the command.
#
# torch's extension loader takes a lock file inside the extension directory on every load, so the
# prebuilt op cannot be used from the read-only image layer directly; a copy (mtimes preserved, so
# ninja sees it as up to date and compiles nothing) into the writable cache under /tmp is cheap.
#
# This script runs only where the image's ENTRYPOINT runs (`docker run IMAGE CMD...`). On Kubernetes
# a container `command:` replaces the ENTRYPOINT (PyTorchJob pods run `torchrun ...`, KFP pods
# `sh -c ...`), so it does NOT run there; the training worker (kubellm.training.worker) seeds the same
# directory itself before DeepSpeed loads an op. Seeding is best-effort in both places: a failed copy
# prints a warning and the command still runs (DeepSpeed then compiles the op on first use).
set -u
src="${KUBELLM_PREBUILT_TORCH_EXTENSIONS:-}"
dst="${TORCH_EXTENSIONS_DIR:-}"
if [ -n "$src" ] && [ -d "$src" ] && [ -n "$dst" ] \
   && { [ ! -e "$dst" ] || [ -z "$(ls -A "$dst" 2>/dev/null)" ]; }; then
  if ! { mkdir -p "$dst" && cp -Rp "$src/." "$dst/"; } 2>/dev/null; then
    echo "kubellm-entrypoint: warning: could not seed $dst from $src; DeepSpeed will compile its ops on first use" >&2
  fi
fi
exec "$@"
