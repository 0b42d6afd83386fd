"""Supply-chain checks run in CI: the dependency audit (``python -m security.audit``)."""
