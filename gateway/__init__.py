"""The gateway: the one endpoint a search frontend calls."""
