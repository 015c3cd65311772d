"""polysignal: one WebRTC signaling server for five wire protocols."""

__version__ = "0.1.0"
