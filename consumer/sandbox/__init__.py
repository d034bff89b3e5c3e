"""Sandboxes that run workflow node code outside the worker's interpreter."""
