"""File formats and atomic file IO: heads, maps, feature stores."""
