#!/usr/bin/env bash
# Build (and optionally push) the three kubellm images with ONE registry/tag setting.
#
#   make images                                        # local build: kubellm-{base,train,eval}:<version>
#   KUBELLM_REGISTRY=registry.example.com/ml KUBELLM_TAG=$(git rev-parse --short HEAD) \
#     KUBELLM_PUSH=1 bash images/build.sh              # build + push, print the digests to pin
#   bash images/build.sh base eval                     # only some images
#
# The KFP components pick their image from the same two settings (kubellm.core.images.image_for:
# KUBELLM_REGISTRY, KUBELLM_TAG, optional KUBELLM_IMAGE_DIGEST_<BASE|TRAIN|EVAL>), so exporting them
# here and when compiling/submitting keeps pipeline and images in step.
# No secret is ever passed to a build: registry login happens outside (docker login / a CI OIDC step).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

version="$(sed -n 's/^version *= *"\(.*\)"/\1/p' pyproject.toml | head -n1)"
REGISTRY="${KUBELLM_REGISTRY:-}"
TAG="${KUBELLM_TAG:-$version}"
PUSH="${KUBELLM_PUSH:-0}"
PLATFORM="${KUBELLM_PLATFORM:-linux/amd64}"
CODE_VERSION="${KUBELLM_CODE_VERSION:-$(git rev-parse HEAD 2>/dev/null || echo "$version")}"
code_paths=(components pipelines pyproject.toml requirements images)
if [ -n "$(git status --porcelain -- "${code_paths[@]}" 2>/dev/null)" ]; then
  # -dirty plus a hash of the uncommitted changes (tracked diff and untracked files): two builds of one
  # commit with different edits must not share a code version (it keys the content-addressed artifacts)
  changes="$( { git diff HEAD -- "${code_paths[@]}"; git ls-files -z --others --exclude-standard -- "${code_paths[@]}" \
    | xargs -0 -r sha256sum; } | sha256sum | cut -c1-12)"
  CODE_VERSION="${CODE_VERSION}-dirty-${changes}"
fi

images=("$@")
[ ${#images[@]} -eq 0 ] && images=(base train eval)

ref() { # image name -> full reference, exactly as kubellm.core.images.image_for builds it
  local name="kubellm-$1"
  if [ -n "$REGISTRY" ]; then echo "${REGISTRY%/}/${name}:${TAG}"; else echo "${name}:${TAG}"; fi
}

command -v docker >/dev/null || { echo "build.sh: docker not found" >&2; exit 1; }
if [ "$PUSH" = "1" ] && [ -z "$REGISTRY" ]; then
  echo "build.sh: KUBELLM_PUSH=1 needs KUBELLM_REGISTRY (e.g. registry.example.com/ml)" >&2; exit 1
fi

for img in "${images[@]}"; do
  case "$img" in base|train|eval) ;; *) echo "build.sh: unknown image '$img' (base, train, eval)" >&2; exit 1;; esac
  echo "==> building $(ref "$img") (code version $CODE_VERSION)"
  DOCKER_BUILDKIT=1 docker build \
    --platform "$PLATFORM" \
    -f "images/${img}.Dockerfile" \
    --build-arg "KUBELLM_CODE_VERSION=${CODE_VERSION}" \
    -t "$(ref "$img")" \
    .
done

if [ "$PUSH" = "1" ]; then
  for img in "${images[@]}"; do
    docker push "$(ref "$img")"
  done
  echo "# pin these digests (export before 'kubellm compile/submit'):"
  for img in "${images[@]}"; do
    # the digest in the repository just pushed to (an image pulled or pushed elsewhere lists others too)
    repo="$(ref "$img")"; repo="${repo%:*}"
    digest="$(docker inspect --format '{{range .RepoDigests}}{{println .}}{{end}}' "$(ref "$img")" \
      | awk -F@ -v repo="$repo" '$1 == repo { print $2; exit }')"
    if [ -z "$digest" ]; then echo "build.sh: no digest in ${repo} for $(ref "$img") after the push" >&2; exit 1; fi
    upper="$(echo "$img" | tr '[:lower:]' '[:upper:]')"
    echo "export KUBELLM_IMAGE_DIGEST_${upper}=${digest}"
  done
fi
