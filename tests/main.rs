//! Integration tests: one binary, one module per area.

mod common;

mod analysis;
mod cli;
mod gradcheck;
mod invariants;
mod layers;
mod parity;
mod pth;
