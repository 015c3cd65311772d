"""The only layer that touches sockets: aiohttp app, routing, connections, shutdown."""
