"""Images: scanning folders and list files, content ids, decoding and preprocessing. No torch at import."""
