"""Twisted glue shared by the server and the card: framing and the channel protocol."""
