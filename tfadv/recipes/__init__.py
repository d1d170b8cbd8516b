"""End-to-end workflows behind the CLI; each is one library call a notebook can make."""
