//! `mimscope reconstruct`: what a trained MAE / MFF-MAE model fills in for the removed patches
//! (facebookresearch/mae `demo/mae_visualize.ipynb`, never ported to mmpretrain).
//!
//! The first n images of a folder (sorted path order; evaluation view: shorter side resized
//! bicubic to the model size, centre crop, ImageNet-normalised) get one random mask from
//! `rng::stream(seed, EvalMask, 0)` and one masked forward. Per image, the loss is the training
//! loss restricted to that image: the mean over its removed patches of the per-patch MSE, so
//! with equal removed counts (always, for MAE's masking) the mean over images is the batch loss.
//!
//! With `norm_pix_loss` the decoder predicts per-patch-normalised pixels; each predicted patch is
//! de-normalised with the mean and the unbiased variance (+1e-6) of the true patch at that
//! position, as the loss normalised it, before display.
//!
//! Outputs in OUT: `reconstruction.png` (original / masked / reconstruction /
//! reconstruction + visible), `losses.csv` (`image,loss`), `masks.safetensors` (`mask` (N, L),
//! 1 = removed) and `inputs.safetensors` (`images` (N, 3, S, S), exactly the model input).

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor, D};
use image::{Rgb, RgbImage};

use crate::checkpoint;
use crate::cli::ReconstructCli;
use crate::config::check_ratio;
use crate::data::{Dataset, IMAGENET_MEAN, IMAGENET_STD};
use crate::figures;
use crate::model::mae::patch_stats;
use crate::model::masking::{patchify, unpatchify};
use crate::model::{Mae, Mask};
use crate::rng::{self, Purpose};

/// Colour of removed patches in the "masked" row.
const MASK_GREY: Rgb<u8> = Rgb([128, 128, 128]);

/// What `reconstruct` is asked to do (the CLI's flags, resolved).
#[derive(Debug, Clone)]
pub struct ReconstructArgs {
    /// Weights file with its `config` metadata.
    pub checkpoint: PathBuf,
    /// Image folder; `None` uses the bundled photos.
    pub data: Option<PathBuf>,
    /// How many images (the first ones in sorted path order; fewer if the folder has fewer).
    pub images: usize,
    /// Seed of the mask stream `(seed, EvalMask, 0)`.
    pub seed: u64,
    /// Fraction of patches removed.
    pub mask_ratio: f64,
    /// Output folder (created if needed).
    pub out: PathBuf,
}

/// One masked forward pass, in displayable form.
#[derive(Debug, Clone)]
pub struct Reconstruction {
    /// The model input, ImageNet-normalised, (B, C, S, S).
    pub inputs: Tensor,
    /// The mask, (B, L), 1 = removed.
    pub mask: Tensor,
    /// The prediction of every patch in the input's (ImageNet-normalised) pixel space,
    /// de-normalised per patch when norm_pix_loss, (B, C, S, S).
    pub pred_pixels: Tensor,
    /// Per image: mean per-patch loss over its removed patches.
    pub per_image_loss: Vec<f32>,
    /// The training loss of the batch (`Output::loss`).
    pub loss: f32,
}

/// Inverse of the per-patch normalisation of `norm_pix_loss`: `pred * sqrt(var + 1e-6) + mean`,
/// with the mean and unbiased variance of each patch of `target` (the raw patchified image),
/// all (B, L, P).
pub fn denormalize_patches(pred: &Tensor, target: &Tensor) -> candle_core::Result<Tensor> {
    let (mean, std) = patch_stats(target)?;
    pred.broadcast_mul(&std)?.broadcast_add(&mean)
}

/// Per image, `sum(mask * loss) / sum(mask)` over its patches; `per_patch` and `mask` are (B, L).
pub fn per_image_loss(per_patch: &Tensor, mask: &Tensor) -> candle_core::Result<Vec<f32>> {
    let per_patch = per_patch.to_dtype(DType::F32)?;
    let mask = mask.to_dtype(DType::F32)?;
    let num = (&per_patch * &mask)?.sum(D::Minus1)?; // B
    let den = mask.sum(D::Minus1)?; // B
    (num / den)?.to_vec1::<f32>()
}

/// Runs `model` on `imgs` (B, C, S, S) with `mask` and brings the prediction to pixel space.
pub fn reconstruct(model: &Mae, imgs: &Tensor, mask: &Mask) -> candle_core::Result<Reconstruction> {
    let cfg = &model.cfg;
    let out = model.forward(imgs, mask)?;
    let m = mask.mask_tensor(DType::F32, imgs.device())?; // B L
    let per_image_loss = per_image_loss(&model.per_patch_loss(imgs, &out.pred)?, &m)?;
    let pred = if cfg.norm_pix_loss {
        denormalize_patches(&out.pred, &patchify(imgs, cfg.patch_size)?)?
    } else {
        out.pred.clone()
    }; // B L P
    Ok(Reconstruction {
        inputs: imgs.clone(),
        mask: m,
        pred_pixels: unpatchify(&pred, cfg.patch_size, cfg.in_chans)?,
        per_image_loss,
        loss: out.loss.to_dtype(DType::F32)?.to_scalar::<f32>()?,
    })
}

/// ImageNet-normalised (B, 3, S, S) -> B displayable images (de-normalised, clamped to [0, 1]).
pub fn to_rgb_images(imgs: &Tensor) -> Result<Vec<RgbImage>> {
    let (b, c, h, w) = imgs.dims4()?;
    if c != 3 {
        bail!("images with {c} channels cannot be shown as RGB (expected 3)");
    }
    let data = imgs
        .to_device(&Device::Cpu)?
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let plane = h * w;
    Ok((0..b)
        .map(|i| {
            let base = i * c * plane;
            RgbImage::from_fn(w as u32, h as u32, |x, y| {
                let at = y as usize * w + x as usize;
                Rgb(std::array::from_fn(|ch| {
                    let v = data[base + ch * plane + at] * IMAGENET_STD[ch] + IMAGENET_MEAN[ch];
                    (v.clamp(0.0, 1.0) * 255.0).round() as u8
                }))
            })
        })
        .collect())
}

/// Whether pixel (x, y) lies in a removed patch; `mask` is one image's row of L values.
fn removed(mask: &[f32], grid: usize, patch: usize, x: u32, y: u32) -> bool {
    let k = (y as usize / patch) * grid + x as usize / patch;
    mask.get(k).is_some_and(|&m| m > 0.5)
}

/// The four figure rows: original, masked (removed patches grey), reconstruction (every patch
/// predicted) and reconstruction + visible (removed patches predicted, visible ones original).
pub fn figure_rows(
    rec: &Reconstruction,
    patch: usize,
) -> Result<Vec<(&'static str, Vec<RgbImage>)>> {
    let originals = to_rgb_images(&rec.inputs)?;
    let predicted = to_rgb_images(&rec.pred_pixels)?;
    let masks = rec.mask.to_device(&Device::Cpu)?.to_vec2::<f32>()?;
    let grid = rec
        .mask
        .dim(1)
        .map(|l| (l as f64).sqrt().round() as usize)?;
    let mut masked = Vec::with_capacity(originals.len());
    let mut pasted = Vec::with_capacity(originals.len());
    for ((orig, pred), m) in originals.iter().zip(&predicted).zip(&masks) {
        masked.push(RgbImage::from_fn(orig.width(), orig.height(), |x, y| {
            if removed(m, grid, patch, x, y) {
                MASK_GREY
            } else {
                *orig.get_pixel(x, y)
            }
        }));
        pasted.push(RgbImage::from_fn(orig.width(), orig.height(), |x, y| {
            if removed(m, grid, patch, x, y) {
                *pred.get_pixel(x, y)
            } else {
                *orig.get_pixel(x, y)
            }
        }));
    }
    Ok(vec![
        ("original", originals),
        ("masked", masked),
        ("reconstruction", predicted),
        ("reconstruction + visible", pasted),
    ])
}

/// `losses.csv`: `image,loss` with 6 decimals, one row per image.
fn losses_csv(paths: &[PathBuf], losses: &[f32]) -> Result<String> {
    let rows = paths
        .iter()
        .zip(losses)
        .map(|(p, l)| [p.display().to_string(), format!("{l:.6}")]);
    crate::output::csv_text(&["image", "loss"], rows)
}

/// The `reconstruct` command: see the module docs.
pub fn run(args: &ReconstructArgs, device: &Device) -> Result<()> {
    if args.images == 0 {
        bail!("--images must be at least 1 (got 0): there is nothing to reconstruct");
    }
    let loaded = checkpoint::load_model(&args.checkpoint, DType::F32, device)
        .with_context(|| format!("loading the model from {}", args.checkpoint.display()))?;
    let model = &loaded.model;
    let cfg = &model.cfg;
    if cfg.in_chans != 3 {
        bail!(
            "{} is a {}-channel model; reconstruct works on RGB images (in_chans 3)",
            args.checkpoint.display(),
            cfg.in_chans
        );
    }
    let l = cfg.num_patches();
    check_ratio(l, args.mask_ratio).map_err(|e| anyhow::anyhow!("{e} of this model"))?;
    let ds = match &args.data {
        Some(dir) => Dataset::open(dir)
            .with_context(|| format!("opening the images in {}", dir.display()))?,
        None => Dataset::bundled()?,
    };
    let n = args.images.min(ds.len());
    let s = cfg.img_size;
    let data = ds.eval_batch(n, s as u32)?;
    let imgs = Tensor::from_vec(data, (n, cfg.in_chans, s, s), device)?; // B C S S
    let mask = Mask::random(
        n,
        l,
        args.mask_ratio,
        &mut rng::stream(args.seed, Purpose::EvalMask, 0),
    );
    let rec = reconstruct(model, &imgs, &mask)
        .with_context(|| format!("running {} on {n} images", args.checkpoint.display()))?;

    write_outputs(args, &rec, &ds.paths()[..n], cfg)?;
    crate::say!(
        "reconstructed {n} images (shorter side resized to {s} px with bicubic Catmull-Rom, \
         centre-cropped; mask ratio {}, loss {:.6}) into {}",
        args.mask_ratio,
        rec.loss,
        args.out.display()
    );
    Ok(())
}

/// Writes the figure, `losses.csv` (one row per path of `paths`) and the masks and inputs
/// into `args.out`, created if needed.
fn write_outputs(
    args: &ReconstructArgs,
    rec: &Reconstruction,
    paths: &[PathBuf],
    cfg: &crate::config::ModelConfig,
) -> Result<()> {
    let out = &args.out;
    std::fs::create_dir_all(out)
        .with_context(|| format!("creating the output folder {}", out.display()))?;
    let note = if cfg.norm_pix_loss {
        "norm_pix_loss: predicted patches de-normalised with each true patch's mean and variance"
    } else {
        "pixel loss (no norm_pix_loss): predictions shown as predicted"
    };
    let caption = format!(
        "{}; mask ratio {}, seed {}; {note}",
        args.checkpoint
            .file_name()
            .map(|f| f.to_string_lossy())
            .unwrap_or_default(),
        args.mask_ratio,
        args.seed
    );
    let rows = figure_rows(rec, cfg.patch_size)?;
    figures::reconstruction_figure(&out.join("reconstruction.png"), &rows, &caption)?;
    let csv = losses_csv(paths, &rec.per_image_loss)?;
    crate::output::write_atomic(&out.join("losses.csv"), csv.as_bytes())?;
    let meta = HashMap::from([
        (
            "checkpoint".to_string(),
            args.checkpoint.display().to_string(),
        ),
        ("seed".to_string(), args.seed.to_string()),
        ("mask_ratio".to_string(), args.mask_ratio.to_string()),
    ]);
    checkpoint::save_tensors(
        &out.join("masks.safetensors"),
        &BTreeMap::from([("mask".to_string(), rec.mask.clone())]),
        meta.clone(),
    )?;
    checkpoint::save_tensors(
        &out.join("inputs.safetensors"),
        &BTreeMap::from([("images".to_string(), rec.inputs.clone())]),
        meta,
    )?;
    Ok(())
}

impl From<&ReconstructCli> for ReconstructArgs {
    fn from(a: &ReconstructCli) -> Self {
        ReconstructArgs {
            checkpoint: a.checkpoint.clone(),
            data: a.data.clone(),
            images: a.images,
            seed: a.seed,
            mask_ratio: a.mask_ratio,
            out: a.out.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compare::Diff;
    use crate::config::ModelConfig;
    use std::path::Path;

    fn tiny(norm_pix_loss: bool) -> ModelConfig {
        ModelConfig {
            norm_pix_loss,
            ..crate::config::test_config()
        }
    }

    /// A checkpoint of a freshly initialised model in `dir`.
    fn checkpoint_in(dir: &Path, cfg: &ModelConfig) -> PathBuf {
        let (_, store) = Mae::init(cfg, 3, DType::F32, &Device::Cpu).unwrap();
        let path = dir.join("model.safetensors");
        checkpoint::save_weights(&path, cfg, &store, HashMap::new()).unwrap();
        path
    }

    /// `n` PNGs of different sizes and colours in `dir/images`, named so that sorted order is
    /// creation order.
    fn images_in(dir: &Path, n: u32) -> PathBuf {
        let folder = dir.join("images");
        std::fs::create_dir_all(&folder).unwrap();
        for i in 0..n {
            let (w, h) = (20 + 4 * i, 18 + 6 * (i % 2));
            let img = RgbImage::from_fn(w, h, |x, y| {
                Rgb([
                    (x * 11 + i * 40) as u8,
                    (y * 13) as u8,
                    ((x ^ y) * 9 + i * 70) as u8,
                ])
            });
            img.save(folder.join(format!("img_{i}.png"))).unwrap();
        }
        folder
    }

    fn random_images(b: usize, s: usize, seed: u64) -> Tensor {
        use rand::Rng;
        let mut rng = rng::stream(seed, Purpose::Synthetic, 0);
        let data: Vec<f32> = (0..b * 3 * s * s)
            .map(|_| rng.random::<f32>() * 4.0 - 2.0)
            .collect();
        Tensor::from_vec(data, (b, 3, s, s), &Device::Cpu).unwrap()
    }

    #[test]
    fn denormalising_the_normalised_target_gives_the_patches_back() {
        let cfg = tiny(true);
        let (model, _) = Mae::init(&cfg, 1, DType::F32, &Device::Cpu).unwrap();
        let imgs = random_images(2, 16, 1);
        let raw = patchify(&imgs, 4).unwrap(); // B L P
        let normalised = model.target(&imgs).unwrap();
        // The loss's target really is per-patch normalised (mean 0), so this is not vacuous.
        assert!(Diff::tensors(&normalised, &raw).unwrap().max_abs > 0.1);
        let back = denormalize_patches(&normalised, &raw).unwrap();
        let err = Diff::tensors(&back, &raw).unwrap().max_abs;
        assert!(err < 1e-4, "max |denorm(target) - patches| = {err}");
    }

    #[test]
    fn denormalize_patches_by_hand() {
        // One patch [1, 2, 3, 6]: mean 3, unbiased var (4+1+0+9)/3 = 14/3.
        let raw = Tensor::from_vec(vec![1f32, 2., 3., 6.], (1, 1, 4), &Device::Cpu).unwrap();
        let pred = Tensor::from_vec(vec![0f32, 1., -1., 0.5], (1, 1, 4), &Device::Cpu).unwrap();
        let got = denormalize_patches(&pred, &raw)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let sd = (14.0f64 / 3.0 + 1e-6).sqrt();
        let want: Vec<f32> = [0.0, 1.0, -1.0, 0.5]
            .iter()
            .map(|&v| (v * sd + 3.0) as f32)
            .collect();
        for (g, w) in got.iter().zip(&want) {
            assert!((g - w).abs() < 1e-5, "{got:?} vs {want:?}");
        }
    }

    #[test]
    fn per_image_losses_are_the_training_loss_of_each_image() {
        let cfg = tiny(true);
        let (model, _) = Mae::init(&cfg, 2, DType::F32, &Device::Cpu).unwrap();
        let (b, l) = (3, cfg.num_patches());
        let imgs = random_images(b, 16, 2);
        let mask = Mask::random(b, l, 0.75, &mut rng::stream(0, Purpose::EvalMask, 0));
        let rec = reconstruct(&model, &imgs, &mask).unwrap();
        // Equal removed counts per image, so the mean of the per-image means is the batch loss.
        let mean = rec.per_image_loss.iter().sum::<f32>() / b as f32;
        assert!(
            (mean - rec.loss).abs() < 1e-5 * rec.loss.abs().max(1.0),
            "{mean} vs {}",
            rec.loss
        );
        // And each one is the training loss of that image alone under its own mask row.
        for i in 0..b {
            let (k, row) = (mask.len_keep, i * l..(i + 1) * l);
            let one = Mask {
                batch: 1,
                num_patches: l,
                len_keep: k,
                ids_keep: mask.ids_keep[i * k..(i + 1) * k].to_vec(),
                ids_restore: mask.ids_restore[row.clone()].to_vec(),
                mask: mask.mask[row].to_vec(),
            };
            let alone = model.forward(&imgs.narrow(0, i, 1).unwrap(), &one).unwrap();
            let want = alone.loss.to_scalar::<f32>().unwrap();
            let got = rec.per_image_loss[i];
            assert!(
                (got - want).abs() < 1e-5 * want.abs().max(1.0),
                "image {i}: {got} vs {want}"
            );
        }
    }

    #[test]
    fn pixel_loss_predictions_are_unpatchified_unchanged() {
        let cfg = tiny(false);
        let (model, _) = Mae::init(&cfg, 4, DType::F32, &Device::Cpu).unwrap();
        let imgs = random_images(2, 16, 4);
        let mask = Mask::random(
            2,
            cfg.num_patches(),
            0.5,
            &mut rng::stream(1, Purpose::EvalMask, 0),
        );
        let rec = reconstruct(&model, &imgs, &mask).unwrap();
        let pred = model.forward(&imgs, &mask).unwrap().pred;
        let want = unpatchify(&pred, 4, 3).unwrap();
        assert_eq!(Diff::tensors(&rec.pred_pixels, &want).unwrap().max_abs, 0.0);
    }

    #[test]
    fn run_writes_the_figure_losses_masks_and_inputs() {
        let tmp = tempfile::tempdir().unwrap();
        let cfg = tiny(true);
        let ckpt = checkpoint_in(tmp.path(), &cfg);
        let data = images_in(tmp.path(), 4);
        let out = tmp.path().join("out").join("nested");
        let args = ReconstructArgs {
            checkpoint: ckpt.clone(),
            data: Some(data.clone()),
            images: 3,
            seed: 7,
            mask_ratio: 0.75,
            out: out.clone(),
        };
        run(&args, &Device::Cpu).unwrap();

        let (n, l, s) = (3usize, cfg.num_patches(), cfg.img_size);
        let png = image::open(out.join("reconstruction.png")).unwrap();
        assert!(
            png.width() >= 3 * 96 && png.height() >= 4 * 96,
            "{:?}",
            (png.width(), png.height())
        );

        let masks =
            checkpoint::load_tensors(&out.join("masks.safetensors"), DType::F32, &Device::Cpu)
                .unwrap();
        let mask = &masks.tensors["mask"];
        assert_eq!(mask.dims(), &[n, l]);
        let expected = Mask::random(n, l, 0.75, &mut rng::stream(7, Purpose::EvalMask, 0));
        assert_eq!(
            mask.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            expected.mask
        );
        for row in mask.to_vec2::<f32>().unwrap() {
            assert_eq!(row.iter().sum::<f32>(), 12.0); // 16 - floor(16 * 0.25)
        }

        let inputs =
            checkpoint::load_tensors(&out.join("inputs.safetensors"), DType::F32, &Device::Cpu)
                .unwrap();
        let images = &inputs.tensors["images"];
        assert_eq!(images.dims(), &[n, 3, s, s]);
        let ds = Dataset::open(&data).unwrap();
        assert_eq!(
            images.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            ds.eval_batch(n, s as u32).unwrap()
        );

        let csv = std::fs::read_to_string(out.join("losses.csv")).unwrap();
        let lines: Vec<&str> = csv.lines().collect();
        assert_eq!(lines[0], "image,loss");
        assert_eq!(lines.len(), 1 + n);
        let model = checkpoint::load_model(&ckpt, DType::F32, &Device::Cpu)
            .unwrap()
            .model;
        let rec = reconstruct(&model, images, &expected).unwrap();
        for (i, line) in lines[1..].iter().enumerate() {
            let (path, loss) = line.rsplit_once(',').unwrap();
            assert_eq!(path, ds.paths()[i].display().to_string());
            assert_eq!(loss.split_once('.').unwrap().1.len(), 6, "{line}");
            assert_eq!(loss, format!("{:.6}", rec.per_image_loss[i]));
        }
    }

    #[test]
    fn run_takes_fewer_images_when_the_folder_has_fewer() {
        let tmp = tempfile::tempdir().unwrap();
        let cfg = tiny(true);
        let args = ReconstructArgs {
            checkpoint: checkpoint_in(tmp.path(), &cfg),
            data: Some(images_in(tmp.path(), 2)),
            images: 5,
            seed: 0,
            mask_ratio: 0.75,
            out: tmp.path().join("out"),
        };
        run(&args, &Device::Cpu).unwrap();
        let csv = std::fs::read_to_string(tmp.path().join("out/losses.csv")).unwrap();
        assert_eq!(csv.lines().count(), 3);
    }

    #[test]
    fn errors_name_the_problem() {
        let tmp = tempfile::tempdir().unwrap();
        let cfg = tiny(true);
        let ckpt = checkpoint_in(tmp.path(), &cfg);
        let data = images_in(tmp.path(), 2);
        let base = ReconstructArgs {
            checkpoint: ckpt.clone(),
            data: Some(data),
            images: 2,
            seed: 0,
            mask_ratio: 0.75,
            out: tmp.path().join("out"),
        };
        let msg = |a: &ReconstructArgs| format!("{:#}", run(a, &Device::Cpu).unwrap_err());

        let zero = ReconstructArgs {
            images: 0,
            ..base.clone()
        };
        assert!(msg(&zero).contains("--images"), "{}", msg(&zero));

        let missing = tmp.path().join("nope.safetensors");
        let m = msg(&ReconstructArgs {
            checkpoint: missing.clone(),
            ..base.clone()
        });
        assert!(m.contains(&missing.display().to_string()), "{m}");

        let empty = tmp.path().join("empty");
        std::fs::create_dir_all(&empty).unwrap();
        let m = msg(&ReconstructArgs {
            data: Some(empty.clone()),
            ..base.clone()
        });
        assert!(m.contains(&empty.display().to_string()), "{m}");

        for ratio in [0.0, 1.0, 0.99] {
            let m = msg(&ReconstructArgs {
                mask_ratio: ratio,
                ..base.clone()
            });
            assert!(m.contains("--mask-ratio"), "{m}");
        }
    }

    #[test]
    fn csv_fields_with_commas_are_quoted() {
        let csv = losses_csv(
            &[PathBuf::from("a,b.png"), PathBuf::from("c.png")],
            &[0.5, 1.25],
        )
        .unwrap();
        assert_eq!(csv, "image,loss\n\"a,b.png\",0.500000\nc.png,1.250000\n");
    }
}
