"""Python face of the compiled core: Gram accumulation, fused head evaluation, backends."""
