"""The download feature behind download.py: sources, transfers, Google Drive, archives, checksums."""
