"""The reliability battery (issue 10): bad inputs, interruptions and hostile clients."""
