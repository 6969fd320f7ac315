"""Fast local I/O and helper threads: the leaf that `format` and `storage` both build on.

Nothing here imports the rest of the package (but `errors`), so the layers above can
share it without importing each other.
"""
