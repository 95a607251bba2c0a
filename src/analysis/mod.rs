//! The MFF paper's three analyses as functions from arrays to tables: Fourier spectra of
//! encoder features ([`spectrum`], on [`features`]), fusion weights ([`fusion`]), and Hessian
//! eigenvalues of the pre-training loss ([`hessian`], on the products of [`hvp`]).
//! Analyses never call the optimiser and never draw; `figures` draws their tables.

pub mod features;
pub mod fusion;
pub mod hessian;
pub mod hvp;
pub mod spectrum;

use std::path::Path;

/// Short, distinct labels for checkpoint paths: the file stems, or `folder/stem` where stems
/// repeat (`runs/mae/final.safetensors` and `runs/mff/final.safetensors` -> `mae/final`,
/// `mff/final`), or the whole path where even that repeats.
pub fn checkpoint_labels(paths: &[&Path]) -> Vec<String> {
    let stem = |p: &Path| {
        p.file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| p.display().to_string())
    };
    let with_parent = |p: &Path| match p.parent().and_then(|d| d.file_name()) {
        Some(d) => format!("{}/{}", d.to_string_lossy(), stem(p)),
        None => stem(p),
    };
    let distinct = |v: &[String]| {
        let mut s = v.to_vec();
        s.sort();
        s.dedup();
        s.len() == v.len()
    };
    for f in [&stem as &dyn Fn(&Path) -> String, &with_parent] {
        let labels: Vec<String> = paths.iter().map(|p| f(p)).collect();
        if distinct(&labels) {
            return labels;
        }
    }
    paths.iter().map(|p| p.display().to_string()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_short_and_distinct() {
        let p = |s: &'static str| Path::new(s);
        assert_eq!(
            checkpoint_labels(&[p("a/mae.safetensors"), p("b/mff.pth")]),
            ["mae", "mff"]
        );
        assert_eq!(
            checkpoint_labels(&[
                p("runs/mae/final.safetensors"),
                p("runs/mff/final.safetensors")
            ]),
            ["mae/final", "mff/final"]
        );
        assert_eq!(
            checkpoint_labels(&[p("x/a/f.st"), p("y/a/f.st")]),
            ["x/a/f.st", "y/a/f.st"]
        );
    }
}
