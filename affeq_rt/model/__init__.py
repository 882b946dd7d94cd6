"""The torch side: build a backbone from its weights source, load checkpoints safely."""
