//! `mimscope convert`: a checkpoint written by other code (`.pth`, mmpretrain names, no stored
//! config; see [`crate::checkpoint::import`]) rewritten in mimscope's own format, MAE names and
//! the config in its metadata, so that every command reads it without flags.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::Path;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};

use crate::checkpoint::describe::config_lines;
use crate::checkpoint::import::{encoder_only_error, import, Imported, KeyLayout, Source};
use crate::checkpoint::{self, ModelOverrides, CONFIG_KEY};

/// `mimscope convert`: imports `input` and writes it to `output` in mimscope's format (MAE
/// names, `config` metadata), atomically. Returns the report to print.
pub fn run(input: &Path, output: &Path, ov: &ModelOverrides) -> Result<String> {
    if output.extension().and_then(|e| e.to_str()) != Some("safetensors") {
        bail!(
            "convert writes safetensors: name the output file *.safetensors (got {})",
            output.display()
        );
    }
    let imp = import(input, ov, DType::F32, &Device::Cpu)?;
    if imp.encoder_only {
        return Err(encoder_only_error(input));
    }
    let (_, store) = checkpoint::build_model(
        input,
        &imp.cfg,
        imp.tensors.clone(),
        DType::F32,
        &Device::Cpu,
    )?;

    let mut r = String::new();
    write_read(&mut r, input, &imp)?;
    write_config(&mut r, &imp)?;

    let mut metadata: HashMap<String, String> = imp
        .metadata
        .iter()
        .filter(|(k, _)| k.as_str() != CONFIG_KEY)
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let name = input
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    metadata.insert("converted_from".into(), name);
    checkpoint::save_weights(output, &imp.cfg, &store, metadata)
        .with_context(|| format!("writing {}", output.display()))?;
    let scalars: usize = store.tensors().values().map(|t| t.elem_count()).sum();
    writeln!(
        r,
        "wrote: {} ({} tensors, {scalars} scalars, config in its metadata)",
        output.display(),
        store.tensors().len()
    )?;
    Ok(r)
}

/// What was read: the file, its format, a `.pth`'s top level and epoch, the renames and notes.
fn write_read(r: &mut String, input: &Path, imp: &Imported) -> Result<()> {
    writeln!(r, "read: {}", input.display())?;
    writeln!(r, "  {}", imp.describe())?;
    if let Source::Pth {
        top_level, epoch, ..
    } = &imp.source
    {
        writeln!(r, "  top-level entries: {}", top_level.join(", "))?;
        if let Some(e) = epoch {
            writeln!(r, "  epoch: {e}")?;
        }
    }
    if imp.layout == KeyLayout::Mmpretrain {
        writeln!(
            r,
            "  renamed {} tensors from mmpretrain to MAE names: backbone.layers.{{i}} -> \
             blocks.{{i}}, neck.decoder_blocks.{{i}} -> decoder_blocks.{{i}} (ln1/ln2 -> \
             norm1/norm2, ffn.layers.0.0 -> mlp.fc1, ffn.layers.1 -> mlp.fc2), \
             backbone.patch_embed.projection -> patch_embed.proj, backbone.ln1 -> norm, \
             neck.ln1 -> decoder_norm, other backbone./neck. prefixes dropped",
            imp.tensors.len()
        )?;
    }
    for note in &imp.notes {
        writeln!(r, "  note: {note}")?;
    }
    Ok(())
}

/// The config written, with where an inferred value came from.
fn write_config(r: &mut String, imp: &Imported) -> Result<()> {
    match &imp.inferred {
        None => writeln!(r, "config (stored in the file):")?,
        Some(_) => writeln!(r, "config (inferred; the file stores none):")?,
    }
    let why: HashMap<&str, &str> = imp
        .inferred
        .iter()
        .flatten()
        .map(|(f, w)| (*f, w.as_str()))
        .collect();
    for (field, value) in config_lines(&imp.cfg) {
        let from = why.get(field).map(|w| format!("  ({w})"));
        writeln!(r, "  {field:<18} {value}{}", from.unwrap_or_default())?;
    }
    Ok(())
}
