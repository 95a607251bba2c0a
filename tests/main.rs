//! Integration tests: one binary, one module per area.

mod common;

mod cli;
mod gradcheck;
mod invariants;
mod parity;
mod pth;
