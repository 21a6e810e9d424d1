"""Vectorised environments: DeepMind Control (CPU workers) and Isaac Lab (imported lazily)."""
