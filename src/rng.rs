//! Seeded random streams.
//!
//! candle's CPU backend cannot be seeded, so nothing random in mimscope comes from candle: every
//! random number is drawn from a ChaCha8 stream keyed by (run seed, purpose, index) and turned
//! into a tensor with `Tensor::from_vec`. The index is usually the training step (or the image
//! index), so a resumed run or a replayed analysis draws exactly the same numbers.

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

/// What a stream is used for; each purpose gets its own independent stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    /// Parameter initialisation.
    Init = 1,
    /// Masking noise of a training step.
    Mask = 2,
    /// Order in which training images are visited.
    Shuffle = 3,
    /// Crops and flips of a training sample.
    Augment = 4,
    /// Masks drawn by `reconstruct` and the analyses.
    EvalMask = 5,
    /// Start vectors of power iteration.
    PowerIteration = 6,
    /// Synthetic inputs of `bench` and tests.
    Synthetic = 7,
    /// Masks of the fixed batches of the Hessian analysis.
    HessianMask = 8,
}

/// The stream for `(seed, purpose, index)`.
pub fn stream(seed: u64, purpose: Purpose, index: u64) -> ChaCha8Rng {
    let mut key = [0u8; 32];
    key[..8].copy_from_slice(&seed.to_le_bytes());
    key[8..16].copy_from_slice(&(purpose as u64).to_le_bytes());
    key[16..24].copy_from_slice(&index.to_le_bytes());
    ChaCha8Rng::from_seed(key)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::Rng;

    fn draw(purpose: Purpose, index: u64) -> Vec<u32> {
        let mut r = stream(7, purpose, index);
        (0..4).map(|_| r.random()).collect()
    }

    #[test]
    fn streams_repeat_and_differ() {
        assert_eq!(draw(Purpose::Mask, 3), draw(Purpose::Mask, 3));
        assert_ne!(draw(Purpose::Mask, 3), draw(Purpose::Mask, 4));
        assert_ne!(draw(Purpose::Mask, 3), draw(Purpose::Init, 3));
    }
}
