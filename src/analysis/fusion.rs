//! MFF's fusion weights: the trajectory a run logged, and the weights stored in checkpoints.

use anyhow::{bail, Context, Result};

use crate::output::{csv_text, CsvTable};

/// softmax(proj_weights) after every logged step, from a run's `fusion_weights.csv`.
#[derive(Debug, Clone, PartialEq)]
pub struct Trajectory {
    /// Fused block indices, in column order.
    pub blocks: Vec<usize>,
    pub steps: Vec<u64>,
    /// One row per step, one weight per fused block.
    pub weights: Vec<Vec<f64>>,
}

impl Trajectory {
    /// Parses `step,layer_{b0},layer_{b1},...` rows.
    pub fn parse(csv: &str) -> Result<Trajectory> {
        let table = CsvTable::parse(csv)?;
        if table.header.is_empty() {
            bail!("empty file: no header row");
        }
        let header = table.header.iter().collect::<Vec<_>>().join(",");
        let mut cols = table.header.iter();
        if cols.next() != Some("step") {
            bail!("header `{header}` does not start with `step`");
        }
        let blocks = cols
            .map(|c| {
                c.strip_prefix("layer_")
                    .and_then(|b| b.parse().ok())
                    .with_context(|| format!("column `{c}` is not `layer_<block>`"))
            })
            .collect::<Result<Vec<usize>>>()?;
        if blocks.is_empty() {
            bail!("no weight columns in `{header}`");
        }
        let (mut steps, mut weights) = (Vec::new(), Vec::new());
        // Blank lines are no rows (the reader skips empty ones; these hold only spaces).
        let rows = table
            .rows
            .iter()
            .filter(|r| !(r.len() == 1 && r[0].trim().is_empty()));
        for (i, vals) in rows.enumerate() {
            if vals.len() != blocks.len() + 1 {
                bail!(
                    "row {} has {} fields, expected {}",
                    i + 2,
                    vals.len(),
                    blocks.len() + 1
                );
            }
            steps.push(
                vals[0]
                    .parse()
                    .with_context(|| format!("row {}: bad step `{}`", i + 2, &vals[0]))?,
            );
            weights.push(
                vals.iter()
                    .skip(1)
                    .map(|v| {
                        v.parse::<f64>()
                            .with_context(|| format!("row {}: bad weight `{v}`", i + 2))
                    })
                    .collect::<Result<Vec<_>>>()?,
            );
        }
        Ok(Trajectory {
            blocks,
            steps,
            weights,
        })
    }
}

/// The fusion weights of one checkpoint: a row group of the `fusion` table.
#[derive(Debug, Clone, PartialEq)]
pub struct CheckpointWeights {
    pub checkpoint: String,
    /// Fused block indices (0-based, the last is the final block).
    pub blocks: Vec<usize>,
    /// softmax(proj_weights), one per fused block.
    pub weights: Vec<f64>,
}

/// CSV: checkpoint,block,weight.
pub fn weights_csv(rows: &[CheckpointWeights]) -> Result<String> {
    let records = rows.iter().flat_map(|r| {
        r.blocks
            .iter()
            .zip(&r.weights)
            .map(|(b, w)| [r.checkpoint.clone(), b.to_string(), format!("{w:.8}")])
    });
    csv_text(&["checkpoint", "block", "weight"], records)
}

/// A text table: one column per checkpoint, one row per fused block.
pub fn weights_table(rows: &[CheckpointWeights]) -> String {
    let mut blocks: Vec<usize> = rows.iter().flat_map(|r| r.blocks.clone()).collect();
    blocks.sort_unstable();
    blocks.dedup();
    let width = rows
        .iter()
        .map(|r| r.checkpoint.len())
        .max()
        .unwrap_or(0)
        .max(8);
    let mut s = format!("{:>8}", "block");
    for r in rows {
        s += &format!("  {:>width$}", r.checkpoint);
    }
    s.push('\n');
    for b in blocks {
        s += &format!("{b:>8}");
        for r in rows {
            match r.blocks.iter().position(|&x| x == b) {
                Some(k) => s += &format!("  {:>width$.4}", r.weights[k]),
                None => s += &format!("  {:>width$}", "-"),
            }
        }
        s.push('\n');
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_training_log() {
        let t = Trajectory::parse("step,layer_0,layer_11\n0,0.5,0.5\n1,0.6,0.4\n").unwrap();
        assert_eq!(t.blocks, [0, 11]);
        assert_eq!(t.steps, [0, 1]);
        assert_eq!(t.weights[1], [0.6, 0.4]);
        for bad in [
            "",
            "x,layer_0\n",
            "step,w0\n",
            "step,layer_0\n1,0.5,0.5\n",
            "step,layer_0\n1,abc\n",
        ] {
            assert!(Trajectory::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn table_aligns_blocks_across_checkpoints() {
        let rows = [
            CheckpointWeights {
                checkpoint: "a".into(),
                blocks: vec![0, 3],
                weights: vec![0.25, 0.75],
            },
            CheckpointWeights {
                checkpoint: "b".into(),
                blocks: vec![1, 3],
                weights: vec![0.5, 0.5],
            },
        ];
        let t = weights_table(&rows);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 4, "{t}");
        assert!(
            lines[1].trim_start().starts_with('0')
                && lines[1].contains("0.2500")
                && lines[1].ends_with('-')
        );
        assert!(lines[3].contains("0.7500") && lines[3].contains("0.5000"));
        assert_eq!(weights_csv(&rows).unwrap().lines().count(), 5);
    }
}
