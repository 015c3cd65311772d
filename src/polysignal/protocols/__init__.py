"""One module per wire protocol: frames in, commands out, events in, frames out; no I/O."""
