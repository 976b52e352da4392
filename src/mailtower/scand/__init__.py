"""mailtower-scand: the scanner daemon, an after-queue SMTP content filter."""
