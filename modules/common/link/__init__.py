"""The module's link to the server: control connection, enrollment and renewal, the module folder,
relay legs, and the ways through firewalls (HTTP CONNECT proxy, WebSocket)."""
