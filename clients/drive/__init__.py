"""The Drive (file sync) client: blocks, the upload/download library, the two-way sync."""
