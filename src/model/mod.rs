//! MAE and MFF-MAE on candle.
//!
//! Notation used in shape comments across the crate: B batch, C channels, H x W image,
//! p patch size, L = (H/p)(W/p) patches, K visible patches, N tokens (1 + K or 1 + L),
//! D encoder width, Dd decoder width, P = p*p*C patch length.

pub mod fusion;
pub mod mae;
pub mod masking;
pub mod params;
pub mod pos_embed;
pub mod vit;

pub use mae::{EncoderTrace, Mae, Output};
pub use masking::Mask;
pub use params::ParamStore;
