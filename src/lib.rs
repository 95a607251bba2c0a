//! mimscope: masked image modelling (MAE, MFF-MAE) training and analysis on candle.
//!
//! Shape notation, used in comments everywhere: B batch, C channels, H x W image, p patch size,
//! L patches, K visible patches, N tokens, D encoder width, Dd decoder width, P = p*p*C.

pub mod analysis;
pub mod checkpoint;
pub mod cli;
pub mod commands;
pub mod compare;
pub mod config;
pub mod data;
pub mod figures;
pub mod kernels;
pub mod memory;
pub mod model;
pub mod output;
pub mod rng;
pub mod train;
