"""K3s manifests (package data), their rendering, and the deploy/rollout logic."""
