//! The layering the README's code map states, checked on the sources: each top-level module of
//! `src/` imports (`crate::...`) only modules of lower layers, so there is no import cycle and
//! no library layer reaches `commands` or `cli`; and the named invariants ("analysis never
//! calls the optimiser", "figures never compute", "only kernels/ chooses a device").
//!
//! Test code (`#[cfg(test)] mod ... { }` blocks and `tests.rs` files) may reach further and
//! is left out.

use std::collections::BTreeMap;
use std::path::Path;

/// The layers, lowest first (the README's code map).
const LAYERS: &[(&str, u32)] = &[
    ("rng", 0),
    ("memory", 0),
    ("output", 0),
    ("compare", 0),
    ("kernels", 1),
    ("data", 2),
    ("config", 3),
    ("model", 4),
    ("checkpoint", 5),
    ("train", 6),
    ("analysis", 6),
    ("figures", 7),
    ("cli", 8),
    ("commands", 9),
];

/// Source text without test modules and line comments.
fn library_code(text: &str) -> String {
    let mut out = String::new();
    let mut rest = text;
    while let Some(at) = rest.find("#[cfg(test)]") {
        out.push_str(&rest[..at]);
        let after = &rest[at..];
        let item_end = after.find(['{', ';']).unwrap_or(after.len());
        if after[..item_end].contains("mod ") && after[item_end..].starts_with('{') {
            // Skip the module's block, braces matched.
            let mut depth = 0usize;
            let mut end = after.len();
            for (i, c) in after.char_indices().skip(item_end) {
                match c {
                    '{' => depth += 1,
                    '}' => {
                        depth -= 1;
                        if depth == 0 {
                            end = i + 1;
                            break;
                        }
                    }
                    _ => {}
                }
            }
            rest = &after[end..];
        } else {
            out.push_str("#[cfg(test)]");
            rest = &after["#[cfg(test)]".len()..];
        }
    }
    out.push_str(rest);
    out.lines()
        .map(|l| l.split("//").next().unwrap_or(""))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The top-level modules named after `crate::` in `code`, `use crate::{a, b::c}` included.
fn crate_references(code: &str) -> Vec<String> {
    let mut out = Vec::new();
    for (at, _) in code.match_indices("crate::") {
        let rest = &code[at + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let mut depth = 0usize;
            let mut item_start = true;
            for (i, c) in group.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => break,
                    '}' => depth -= 1,
                    ',' if depth == 0 => item_start = true,
                    c if item_start && (c.is_ascii_alphabetic() || c == '_') => {
                        let name: String = group[i..]
                            .chars()
                            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                            .collect();
                        out.push(name);
                        item_start = false;
                    }
                    _ => {}
                }
            }
        } else {
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            // `crate::say!(..)`: the exported macros live at the crate's root but are defined
            // in output.rs (layer 0).
            if rest[name.len()..].starts_with('!') {
                out.push("output".to_string());
            } else {
                out.push(name);
            }
        }
    }
    out
}

/// For every top-level module: the other top-level modules its library code names, each with
/// a file that names it.
fn imports() -> BTreeMap<String, BTreeMap<String, String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut out: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
    for entry in walkdir::WalkDir::new(&src) {
        let entry = entry.unwrap();
        let path = entry.path();
        let rel = path.strip_prefix(&src).unwrap();
        let name = path.file_name().unwrap().to_string_lossy();
        if !name.ends_with(".rs") || name == "tests.rs" || rel.components().count() == 0 {
            continue;
        }
        let top = rel
            .components()
            .next()
            .unwrap()
            .as_os_str()
            .to_string_lossy()
            .trim_end_matches(".rs")
            .to_string();
        if top == "lib" || top == "main" {
            continue;
        }
        let code = library_code(&std::fs::read_to_string(path).unwrap());
        for r in crate_references(&code) {
            if r != top {
                out.entry(top.clone())
                    .or_default()
                    .entry(r)
                    .or_insert_with(|| rel.display().to_string());
            }
        }
    }
    out
}

#[test]
fn each_module_imports_only_lower_layers() {
    let layer: BTreeMap<&str, u32> = LAYERS.iter().copied().collect();
    let graph = imports();
    assert!(graph.len() >= 10, "too few modules found: {graph:?}");
    let mut wrong = Vec::new();
    for (module, targets) in &graph {
        let Some(&l) = layer.get(module.as_str()) else {
            wrong.push(format!(
                "src/{module} is in no layer: add it to the README and here"
            ));
            continue;
        };
        for (target, file) in targets {
            match layer.get(target.as_str()) {
                Some(&t) if t < l => {}
                Some(&t) => wrong.push(format!(
                    "{file}: {module} (layer {l}) imports {target} (layer {t})"
                )),
                None => wrong.push(format!("{file}: {module} names unknown crate::{target}")),
            }
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

#[test]
fn the_named_invariants_hold() {
    let graph = imports();
    let imports = |a: &str, b: &str| graph.get(a).is_some_and(|t| t.contains_key(b));
    // Analysis never calls the optimiser; training never runs an analysis.
    assert!(!imports("analysis", "train") && !imports("train", "analysis"));
    // Figures never compute: they draw tables (no model, no checkpoint).
    assert!(!imports("figures", "model") && !imports("figures", "checkpoint"));
    // Only kernels/ chooses a device for a computation: no library module outside it asks
    // whether a tensor or device is the CPU's (train refuses bf16 on the CPU, a check on the
    // settings, and memory.rs reads a GPU's memory; both say so here).
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let allowed = ["train/mod.rs", "memory.rs"];
    for entry in walkdir::WalkDir::new(&src) {
        let entry = entry.unwrap();
        let rel = entry
            .path()
            .strip_prefix(&src)
            .unwrap()
            .display()
            .to_string();
        if !rel.ends_with(".rs") || rel.starts_with("kernels/") || rel.starts_with("commands/") {
            continue;
        }
        let code = library_code(&std::fs::read_to_string(entry.path()).unwrap());
        if code.contains(".is_cpu()") || code.contains(".is_cuda()") {
            assert!(allowed.contains(&rel.as_str()), "{rel} picks by device");
        }
    }
}

#[test]
fn the_reference_parser_finds_grouped_and_plain_paths() {
    let code = library_code(
        "use crate::{model::{Mae, Mask}, kernels};\nlet x = crate::output::write(); // crate::cli\n\
         crate::say!(\"x\");\n#[cfg(test)]\nmod tests {\n    use crate::commands;\n}\n",
    );
    assert_eq!(
        crate_references(&code),
        ["model", "kernels", "output", "output"]
    );
}
