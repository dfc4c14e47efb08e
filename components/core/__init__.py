"""Storage, manifests, typed configs and small shared utilities every stage uses."""
