"""Offline curation: movies -> shots -> samples -> captions -> clips, manifest and ArrayRecord shards."""
