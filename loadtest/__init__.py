"""Locust load suite: terminals speaking the binary protocol (see loadtest/README.md once written)."""
