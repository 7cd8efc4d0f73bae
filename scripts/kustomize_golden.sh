#!/usr/bin/env bash
# Write what `kubectl kustomize` makes of each overlay under deploy/kubernetes/overlays to
# tests/kustomized/OVERLAY.yaml: the tests compare the project's own renderer
# (tests/kustomize.py, which CI runs without kubectl) against these files. Run it after
# changing the manifests, on a machine with kubectl.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v kubectl >/dev/null || { echo "kubectl is not installed" >&2; exit 1; }
for overlay in deploy/kubernetes/overlays/*/; do
    name=$(basename "$overlay")
    kubectl kustomize "$overlay" > "tests/kustomized/$name.yaml"
    echo "tests/kustomized/$name.yaml"
done
