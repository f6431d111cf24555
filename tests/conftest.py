"""Shared by every test folder: pytest puts this folder on sys.path (prepend import mode), so `drafter_options`
beside it can be imported from any test file."""
