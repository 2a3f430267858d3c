"""What the pipeline writes to disk: atomic file writes and the output folders it owns (marked, swapped in whole)."""
