"""The integration tests' service is tests/conftest.py's `service` (the security tests share it)."""
