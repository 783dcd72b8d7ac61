"""The model catalog and custom open_clip configs, shipped as data with the server."""
