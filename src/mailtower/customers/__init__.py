"""Customers: their policies, validated once and applied by every reader."""
