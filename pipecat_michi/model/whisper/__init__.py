"""Whisper-based listening head: exact front-end, weight loaders, streaming encoder."""
