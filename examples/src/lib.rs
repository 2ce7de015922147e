//! Runnable examples of Phalanx; see `examples/README.md` for the commands.
