//! Integration tests: one binary, one module per area.

mod common;

mod analysis;
mod cli;
mod gradcheck;
mod invariants;
mod parity;
mod pth;
