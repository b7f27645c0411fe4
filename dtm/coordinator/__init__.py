"""The coordinator: the I/O shell around dtm.core.transaction."""
