"""What the tests share: fixture modules (loaded as plugins by tests/conftest.py), data
builders and run helpers, and scripts run as `python -m tests.helpers.NAME` or by path.
Test modules import from here, never from one another."""
