"""rclip: robust CLIP with optimal transport — the library behind the book."""
