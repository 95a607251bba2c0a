//! Reading PyTorch `.pth` checkpoints: the zip archives `torch.save` writes (PyTorch >= 1.6).
//!
//! An archive holds `NAME/data.pkl`, the pickled object (protocol 2), and one entry
//! `NAME/data/K` per tensor storage. candle's [`candle_core::pickle`] parses the pickle into an
//! [`Object`] tree; this module finds the state dict in it, wrapped as the official checkpoints
//! wrap it (see [`Wrapper`]):
//! - `{"meta": ..., "state_dict": sd}`: mmengine / mmpretrain (MFF's released files);
//! - `{"model": sd, "optimizer": ..., "epoch": ..., "args": Namespace(..)}`: facebookresearch/mae;
//! - `sd` itself: a bare state dict.
//!
//! Only the state dict's tensors are read, whatever their strides, storage offset or sharing;
//! its other entries (torch's `_metadata` record of module versions, strings, ...) are listed in
//! [`PthFile::other_entries`]. Everything else in the file (optimizer state, arguments) is parsed
//! but never read. Key names are left as they are; [`super::import`] maps them.

use std::collections::BTreeMap;
use std::io::{BufReader, Read, Seek};
use std::path::Path;

use anyhow::{bail, Context, Result};
use candle_core::pickle::{Object, Stack, TensorInfo};
use candle_core::{Device, Tensor};

/// First bytes of a zip archive, and so of every `.pth` written by PyTorch >= 1.6.
pub const ZIP_MAGIC: &[u8; 4] = b"PK\x03\x04";

/// What a file is, by its first bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// A zip archive (PyTorch >= 1.6 `torch.save`).
    Zip,
    /// A bare pickle (protocol 2 header `\x80\x02`): PyTorch's legacy serialisation.
    LegacyPickle,
    /// Anything else (safetensors starts with its little-endian header length).
    Other,
}

/// The format of the file at `path`, from its first bytes.
pub fn sniff(path: &Path) -> Result<Format> {
    let mut f = std::fs::File::open(path).with_context(|| {
        format!(
            "reading checkpoint {} (does the file exist?)",
            path.display()
        )
    })?;
    let mut head = [0u8; 4];
    let n = f
        .read(&mut head)
        .with_context(|| format!("reading {}", path.display()))?;
    Ok(if n == 4 && &head == ZIP_MAGIC {
        Format::Zip
    } else if n >= 2 && head[..2] == [0x80, 0x02] {
        Format::LegacyPickle
    } else {
        Format::Other
    })
}

/// Where in the saved object the state dict was found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wrapper {
    /// `obj["state_dict"]` (mmengine, mmpretrain, Lightning).
    StateDict,
    /// `obj["model"]` (facebookresearch/mae's `misc.save_model` and released files).
    Model,
    /// `obj` itself.
    Bare,
}

impl std::fmt::Display for Wrapper {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Wrapper::StateDict => "the `state_dict` entry",
            Wrapper::Model => "the `model` entry",
            Wrapper::Bare => "the top level (a bare state dict)",
        })
    }
}

/// The state dict of a `.pth` file.
#[derive(Debug)]
pub struct PthFile {
    pub wrapper: Wrapper,
    /// Names of the top-level dict's entries, sorted.
    pub top_level: Vec<String>,
    /// Every tensor of the state dict by its key, on the CPU in the file's dtype.
    pub tensors: BTreeMap<String, Tensor>,
    /// State-dict entries that are not tensors (torch's `_metadata`, strings, ...).
    pub other_entries: Vec<String>,
    /// The training epoch, when the file records one (`epoch` or `meta.epoch`).
    pub epoch: Option<i64>,
}

/// Reads the state dict of the `.pth` file at `path` (see the module docs).
pub fn read(path: &Path) -> Result<PthFile> {
    match sniff(path)? {
        Format::Zip => {}
        Format::LegacyPickle => bail!(
            "{} uses PyTorch's legacy serialisation (before 1.6, not a zip archive), which \
             mimscope cannot read; re-save it with a recent PyTorch: \
             torch.save(torch.load(path, map_location=\"cpu\"), new_path)",
            path.display()
        ),
        Format::Other => bail!(
            "{} is not a PyTorch checkpoint: it does not start with the zip signature PK\\x03\\x04 \
             that torch.save writes (a truncated download, or another format? mimscope reads \
             .pth zip archives and .safetensors files)",
            path.display()
        ),
    }
    let file = std::fs::File::open(path)
        .with_context(|| format!("reading checkpoint {}", path.display()))?;
    let mut zip = zip::ZipArchive::new(BufReader::new(file)).with_context(|| {
        format!(
            "{} starts like a zip archive but cannot be opened as one (truncated download?)",
            path.display()
        )
    })?;
    let pkl = data_pkl_name(&zip).with_context(|| format!("in {}", path.display()))?;
    let obj = {
        let entry = zip
            .by_name(&pkl)
            .with_context(|| format!("opening {pkl} in {}", path.display()))?;
        let mut stack = Stack::empty();
        stack
            .read_loop(&mut BufReader::new(entry))
            .with_context(|| {
                format!(
                "parsing {pkl} in {}: candle's pickle reader handles the protocol-2 pickles that \
                 torch.save writes; if the file holds unusual Python objects or was saved with a \
                 higher pickle_protocol, re-save only the weights in PyTorch: \
                 torch.save({{\"model\": state_dict}}, new_path)",
                path.display()
            )
            })?;
        stack
            .finalize()
            .with_context(|| format!("parsing {pkl} in {}", path.display()))?
    };
    // `NAME/data.pkl` -> `NAME/data`, the folder of the storages (as candle's reader does).
    let dir = pkl.strip_suffix(".pkl").unwrap_or(&pkl).to_string();

    let Object::Dict(top) = obj else {
        bail!(
            "{}: the saved object is {}, not a dict; mimscope reads a state dict, bare or as \
             `state_dict` (mmpretrain) or `model` (facebookresearch/mae); in PyTorch, save \
             torch.save({{\"model\": model.state_dict()}}, path)",
            path.display(),
            describe(&obj)
        );
    };
    let mut top_level: Vec<String> = top.iter().map(|(k, _)| key_name(k)).collect();
    top_level.sort();
    let epoch = epoch_of(&top);
    let find = |name: &str| {
        top.iter()
            .find(|(k, _)| key_name(k) == name)
            .map(|(_, v)| v)
    };

    let (wrapper, sd) = if let Some(v) = find("state_dict") {
        (Wrapper::StateDict, v.clone())
    } else if let Some(v) = find("model") {
        (Wrapper::Model, v.clone())
    } else if top.iter().any(|(k, v)| {
        matches!(
            v.clone().into_tensor_info(k.clone(), Path::new(&dir)),
            Ok(Some(_))
        )
    }) {
        (Wrapper::Bare, Object::Dict(top.clone()))
    } else {
        bail!(
            "{}: no state dict found: the top-level dict has entries [{}], none of them tensors; \
             mimscope expects `state_dict` (mmpretrain), `model` (facebookresearch/mae) or a bare \
             state dict of tensors",
            path.display(),
            top_level.join(", ")
        );
    };
    let Object::Dict(entries) = sd else {
        bail!(
            "{}: {wrapper} is {}, not a state dict (a dict of tensors); if it is a pickled \
             nn.Module, save its state dict instead: torch.save({{\"model\": \
             model.state_dict()}}, path)",
            path.display(),
            describe(&sd)
        );
    };

    let mut tensors = BTreeMap::new();
    let mut other_entries = Vec::new();
    for (k, v) in entries {
        let name = key_name(&k);
        match v.into_tensor_info(k, Path::new(&dir)) {
            Ok(Some(info)) => {
                let t = read_tensor(&mut zip, &info)
                    .with_context(|| format!("reading tensor `{name}` of {}", path.display()))?;
                if tensors.insert(name.clone(), t).is_some() {
                    bail!("{}: the state dict has `{name}` twice", path.display());
                }
            }
            Ok(None) => other_entries.push(name),
            Err(e) => bail!(
                "{}: cannot read tensor `{name}` ({e}); mimscope reads float32, float64, \
                 float16, bfloat16, uint8 and int64 tensors: convert it in PyTorch first \
                 (sd[k] = sd[k].float())",
                path.display()
            ),
        }
    }
    Ok(PthFile {
        wrapper,
        top_level,
        tensors,
        other_entries,
        epoch,
    })
}

/// The archive's one `NAME/data.pkl`.
fn data_pkl_name<R: Read + Seek>(zip: &zip::ZipArchive<R>) -> Result<String> {
    let names = zip
        .file_names()
        .collect::<std::result::Result<Vec<_>, _>>()
        .context("listing the zip archive")?;
    let pkls: Vec<String> = names
        .iter()
        .filter(|n| *n == "data.pkl" || n.ends_with("/data.pkl"))
        .map(|n| n.to_string())
        .collect();
    match pkls.as_slice() {
        [one] => Ok(one.clone()),
        [] => bail!(
            "the zip archive has no data.pkl, so torch.save did not write it (entries: {})",
            names.iter().take(8).cloned().collect::<Vec<_>>().join(", ")
        ),
        many => bail!(
            "the zip archive has {} data.pkl entries ({}); expected one, as torch.save writes",
            many.len(),
            many.join(", ")
        ),
    }
}

/// A dict key as text: strings as they are, anything else in candle's debug form.
fn key_name(k: &Object) -> String {
    match k {
        Object::Unicode(s) => s.clone(),
        Object::Int(i) => i.to_string(),
        Object::Long(i) => i.to_string(),
        other => format!("{other:?}"),
    }
}

/// A short description of a pickled object, for errors.
fn describe(obj: &Object) -> String {
    match obj {
        Object::Dict(_) => "a dict".into(),
        Object::List(_) => "a list".into(),
        Object::Tuple(_) => "a tuple".into(),
        Object::Unicode(_) => "a string".into(),
        Object::Int(_) | Object::Long(_) => "an integer".into(),
        Object::Float(_) => "a float".into(),
        Object::None => "None".into(),
        // An object built from a class (`torch.save(model)` pickles the nn.Module's class).
        Object::Reduce { callable, .. } | Object::Build { callable, .. } => {
            match callable.as_ref() {
                Object::Class {
                    module_name,
                    class_name,
                } => format!("a {module_name}.{class_name} object"),
                inner => describe(inner),
            }
        }
        _ => "a Python object".into(),
    }
}

/// `epoch` at the top level, else `meta.epoch` (mmengine).
fn epoch_of(top: &[(Object, Object)]) -> Option<i64> {
    let get = |d: &[(Object, Object)], name: &str| {
        d.iter()
            .find(|(k, _)| matches!(k, Object::Unicode(s) if s == name))
            .map(|(_, v)| v.clone())
    };
    let int = |o: Object| o.int_or_long().ok();
    get(top, "epoch")
        .and_then(int)
        .or_else(|| match get(top, "meta") {
            Some(Object::Dict(meta)) => get(&meta, "epoch").and_then(int),
            _ => None,
        })
}

/// Reads one tensor from its storage entry: contiguous ones directly, any other strides by
/// gathering from the whole storage.
fn read_tensor<R: Read + Seek>(zip: &mut zip::ZipArchive<R>, info: &TensorInfo) -> Result<Tensor> {
    let mut entry = zip.by_name(&info.path).with_context(|| {
        format!(
            "the storage {} is missing from the archive (truncated file?)",
            info.path
        )
    })?;
    let size = info.dtype.size_in_bytes();
    let layout = &info.layout;
    let dims = layout.dims().to_vec();
    let n: usize = dims.iter().product();
    let short = || {
        format!(
            "the storage {} is shorter than the tensor needs (truncated file?)",
            info.path
        )
    };
    if layout.is_contiguous() {
        // candle's TensorInfo gives the storage offset in bytes.
        std::io::copy(
            &mut (&mut entry).take(layout.start_offset() as u64),
            &mut std::io::sink(),
        )?;
        let mut buf = vec![0u8; n * size];
        entry.read_exact(&mut buf).with_context(short)?;
        return Ok(Tensor::from_raw_buffer(
            &buf,
            info.dtype,
            &dims,
            &Device::Cpu,
        )?);
    }
    let mut buf = vec![0u8; info.storage_size * size];
    entry.read_exact(&mut buf).with_context(short)?;
    let storage = Tensor::from_raw_buffer(&buf, info.dtype, &[info.storage_size], &Device::Cpu)?;
    let idx = strided_indices(&dims, layout.stride(), layout.start_offset() / size);
    if let Some(&bad) = idx.iter().find(|&&i| i >= info.storage_size) {
        bail!(
            "the view reaches element {bad} of a {}-element storage (corrupt file?)",
            info.storage_size
        );
    }
    let idx = idx.into_iter().map(|i| i as u32).collect::<Vec<u32>>();
    let idx = Tensor::from_vec(idx, n, &Device::Cpu)?;
    Ok(storage.index_select(&idx, 0)?.reshape(dims)?)
}

/// Storage positions of the elements of a strided view, in row-major order.
fn strided_indices(dims: &[usize], strides: &[usize], offset: usize) -> Vec<usize> {
    let n: usize = dims.iter().product();
    let mut out = Vec::with_capacity(n);
    let mut pos = vec![0usize; dims.len()];
    for _ in 0..n {
        out.push(offset + pos.iter().zip(strides).map(|(i, s)| i * s).sum::<usize>());
        for d in (0..dims.len()).rev() {
            pos[d] += 1;
            if pos[d] < dims[d] {
                break;
            }
            pos[d] = 0;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strided_indices_walk_row_major() {
        // A (2,3) row-major tensor transposed: (3,2) with strides (1,3).
        assert_eq!(strided_indices(&[3, 2], &[1, 3], 0), vec![0, 3, 1, 4, 2, 5]);
        // Every other column of a (3,4) tensor, at an offset of 5.
        assert_eq!(
            strided_indices(&[3, 2], &[4, 2], 5),
            vec![5, 7, 9, 11, 13, 15]
        );
        // A scalar is one element at the offset.
        assert_eq!(strided_indices(&[], &[], 7), vec![7]);
        assert!(strided_indices(&[0, 3], &[3, 1], 0).is_empty());
    }
}
