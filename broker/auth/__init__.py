"""Who a connection is and which channels it may subscribe."""
