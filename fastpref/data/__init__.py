"""Data shipped with fastpref (see README.md here)."""
