"""The method: extraction, the one-pass Gram fit, solvers, cross-network evaluation."""
