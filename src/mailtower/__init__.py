"""mailtower: e-mail virus-scanning control towers, built as code and proven end to end."""

__version__ = "0.1.0"
