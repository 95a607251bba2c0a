//! The feature maps the analyses look at: the encoder's residual stream on unmasked images.
//!
//! Layer names follow the paper figures: `0` is the patch embedding (+ position), `i` the
//! output of block i-1, `i.5` (with sublayers) the stream inside block i after its attention
//! residual, as how-do-vits-work analyses both halves, and `fused` MFF's fused sequence before
//! the final norm. The cls token is dropped, so every map is (B, L, D) with L = h*w patches.

use candle_core::{Result, Tensor};

use crate::model::{EncoderTrace, Mae};

/// One analysed layer of the encoder.
#[derive(Debug, Clone, PartialEq)]
pub struct Layer {
    /// `0`..`depth`, `i.5` for block i's attention half, or `fused`.
    pub name: String,
    /// Position in the encoder as a fraction of its depth; `fused` is 1 (it replaces the last
    /// block's output).
    pub depth: f64,
}

/// The layers [`features`] returns for an encoder of `depth` blocks, in depth order.
pub fn layers(depth: usize, sublayers: bool, fused: bool) -> Vec<Layer> {
    let mut out = Vec::new();
    for i in 0..=depth {
        if sublayers && i > 0 {
            out.push(Layer {
                name: format!("{}.5", i - 1),
                depth: (i as f64 - 0.5) / depth as f64,
            });
        }
        out.push(Layer {
            name: i.to_string(),
            depth: i as f64 / depth as f64,
        });
    }
    if fused {
        out.push(Layer {
            name: "fused".to_string(),
            depth: 1.0,
        });
    }
    out
}

/// The residual-stream maps of the unmasked encoder on `imgs`, cls dropped, each (B, L, D), in
/// the order of [`layers`].
pub fn features(model: &Mae, imgs: &Tensor, sublayers: bool) -> Result<Vec<(Layer, Tensor)>> {
    let trace = model.forward_encoder_unmasked(imgs)?;
    select(&trace, model.cfg.depth, sublayers)
}

fn select(trace: &EncoderTrace, depth: usize, sublayers: bool) -> Result<Vec<(Layer, Tensor)>> {
    let drop_cls = |t: &Tensor| -> Result<Tensor> {
        let n = t.dim(1)?;
        t.narrow(1, 1, n - 1) // B 1+L D -> B L D
    };
    let mut out = Vec::new();
    for layer in layers(depth, sublayers, trace.fused.is_some()) {
        let t = match layer.name.as_str() {
            "fused" => trace.fused.as_ref().map(drop_cls).transpose()?,
            name => match name.strip_suffix(".5") {
                Some(b) => trace.attn.get(parse(b)?).map(drop_cls).transpose()?,
                None => trace.layers.get(parse(name)?).map(drop_cls).transpose()?,
            },
        };
        let t = t.ok_or_else(|| candle_core::Error::Msg(format!("no layer {}", layer.name)))?;
        out.push((layer, t));
    }
    Ok(out)
}

fn parse(s: &str) -> Result<usize> {
    s.parse()
        .map_err(|_| candle_core::Error::Msg(format!("bad layer name {s}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layer_names_and_depths() {
        let names: Vec<String> = layers(2, true, true).into_iter().map(|l| l.name).collect();
        assert_eq!(names, ["0", "0.5", "1", "1.5", "2", "fused"]);
        let l = layers(4, false, false);
        assert_eq!(l.len(), 5);
        assert_eq!(l[2].depth, 0.5);
        assert_eq!(layers(4, true, false)[1].depth, 0.125);
    }
}
