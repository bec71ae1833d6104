"""Sans-IO wire format: stream framing and control messages (no trio, no sockets)."""
