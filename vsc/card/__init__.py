"""The Virtual Smart Card process and its client side of the protected channel."""
