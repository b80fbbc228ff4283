"""The VSC Server: card records, the life cycle of Figure 4, and the channel endpoint."""
