"""Networking: identities, DHT records, and the P2P streams that carry payloads and state."""
