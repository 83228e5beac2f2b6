"""Tasks: each keeps its problem generation or loading, prompt rendering and answer format together."""
