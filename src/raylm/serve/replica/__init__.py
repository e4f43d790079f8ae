"""One Serve deployment per model: each replica hosts one engine behind admission (server.py), a bounded
weighted-fair queue that refuses with 429 what would wait too long (admission.py)."""
