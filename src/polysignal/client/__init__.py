"""Clients for polysignal's protocols; ``polysignal.client.signalfire`` speaks Signal-Fire."""
