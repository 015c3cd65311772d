"""polysignal: one WebRTC signaling server for six wire protocols."""

__version__ = "0.1.0"
