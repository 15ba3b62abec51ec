"""The control plane: rollouts and their gates, replicas, lifecycle, pinned failures."""
