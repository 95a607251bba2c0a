//! Figures: one function per figure, drawing only what it is given (figures never compute).
//!
//! Text is drawn by plotters with the DejaVu Sans font embedded in the binary
//! (`assets/fonts/DejaVuSans.ttf`, registered once as "sans-serif"), so figures render the
//! same on a machine without fonts. PNGs are written atomically.

pub mod charts;

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Once;

use anyhow::{anyhow, bail, Context, Result};
use image::imageops::{self, FilterType};
use image::RgbImage;
use plotters::backend::RGBPixel;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use crate::output::write_atomic;

/// The embedded font (DejaVu licence in `assets/fonts/LICENSE-DejaVu.txt`).
static FONT: &[u8] = include_bytes!("../../assets/fonts/DejaVuSans.ttf");
/// The family name the font is registered under.
pub(crate) const FAMILY: &str = "sans-serif";

/// Registers the embedded font with plotters (once per process); every figure calls this first.
pub fn register_font() -> Result<()> {
    static ONCE: Once = Once::new();
    static OK: AtomicBool = AtomicBool::new(false);
    ONCE.call_once(|| {
        let ok = plotters::style::register_font(FAMILY, FontStyle::Normal, FONT).is_ok();
        OK.store(ok, Ordering::SeqCst);
    });
    if OK.load(Ordering::SeqCst) {
        Ok(())
    } else {
        bail!("the embedded font assets/fonts/DejaVuSans.ttf could not be parsed")
    }
}

/// Images are upscaled (nearest neighbour, integer factor) to at least this many pixels.
const MIN_CELL: u32 = 96;
/// Outer margin and label padding, in pixels.
const MARGIN: u32 = 10;
/// Space between images, in pixels.
const GAP: u32 = 4;
const LABEL_SIZE: f64 = 16.0;
const CAPTION_SIZE: f64 = 14.0;

/// Writes a PNG grid to `path`: one row per entry of `rows` (label at the left, then its images,
/// one column per image, each upscaled with nearest neighbour to at least ~96 px), and `note` as
/// a caption line at the bottom. Every row must hold the same number of images, all of one size.
pub fn reconstruction_figure(
    path: &Path,
    rows: &[(&str, Vec<RgbImage>)],
    note: &str,
) -> Result<()> {
    register_font()?;
    let (iw, ih) = image_size(path, rows)?;
    let cols = rows[0].1.len() as u32;
    let scale = MIN_CELL.div_ceil(iw.max(ih).max(1)).max(1);
    let cell = (iw * scale, ih * scale);
    let (cw, ch) = cell;

    let label_font = (FAMILY, LABEL_SIZE).into_font();
    let caption_font = (FAMILY, CAPTION_SIZE).into_font();
    let mut label_w = 0;
    for (label, _) in rows {
        label_w = label_w.max(text_size(&label_font, label)?.0);
    }
    let (caption_w, caption_h) = text_size(&caption_font, note)?;
    let grid_x = MARGIN + label_w + MARGIN;
    let grid_w = cols * cw + (cols - 1) * GAP;
    let nrows = rows.len() as u32;
    let grid_h = nrows * ch + (nrows - 1) * GAP;
    let width = (grid_x + grid_w + MARGIN).max(MARGIN + caption_w + MARGIN);
    let caption_y = MARGIN + grid_h + MARGIN;
    let height = caption_y + caption_h.max(CAPTION_SIZE as u32) + MARGIN;

    let mut canvas = RgbImage::from_pixel(width, height, image::Rgb([255, 255, 255]));
    for (r, (_, imgs)) in rows.iter().enumerate() {
        for (c, img) in imgs.iter().enumerate() {
            let resized = imageops::resize(img, cw, ch, FilterType::Nearest);
            let x = grid_x + c as u32 * (cw + GAP);
            let y = MARGIN + r as u32 * (ch + GAP);
            imageops::replace(&mut canvas, &resized, i64::from(x), i64::from(y));
        }
    }
    let text = FigureText {
        rows,
        row_height: ch,
        label_font,
        note,
        caption_font,
        caption_y,
    };
    write_png(path, &text.draw(path, canvas)?)
}

/// The size of every image of `rows`, after checking that there is at least one, that every
/// row holds as many as the first and that all have one size.
fn image_size(path: &Path, rows: &[(&str, Vec<RgbImage>)]) -> Result<(u32, u32)> {
    let Some((_, first)) = rows.first() else {
        bail!("reconstruction figure {}: no rows to draw", path.display());
    };
    let Some(sample) = first.first() else {
        bail!(
            "reconstruction figure {}: no images to draw",
            path.display()
        );
    };
    let (iw, ih) = sample.dimensions();
    for (label, imgs) in rows {
        if imgs.len() != first.len() {
            bail!(
                "reconstruction figure: row `{label}` has {} images, the first row {}",
                imgs.len(),
                first.len()
            );
        }
        if let Some(bad) = imgs.iter().find(|i| i.dimensions() != (iw, ih)) {
            bail!(
                "reconstruction figure: row `{label}` has a {:?} image, the others are {iw}x{ih}",
                bad.dimensions()
            );
        }
    }
    Ok((iw, ih))
}

/// The reconstruction figure's text: a label left of each row, the caption below the grid.
struct FigureText<'a> {
    rows: &'a [(&'a str, Vec<RgbImage>)],
    row_height: u32,
    label_font: FontDesc<'a>,
    note: &'a str,
    caption_font: FontDesc<'a>,
    caption_y: u32,
}

impl FigureText<'_> {
    /// Draws the text onto `canvas` (the image grid) with plotters.
    fn draw(self, path: &Path, canvas: RgbImage) -> Result<RgbImage> {
        let (width, height) = canvas.dimensions();
        let mut buf = canvas.into_raw();
        {
            let backend =
                BitMapBackend::<RGBPixel>::with_buffer_and_format(&mut buf, (width, height))
                    .map_err(|e| anyhow!("drawing {}: {e}", path.display()))?;
            let root = backend.into_drawing_area();
            let label_style = self
                .label_font
                .color(&BLACK)
                .pos(Pos::new(HPos::Left, VPos::Center));
            for (r, (label, _)) in self.rows.iter().enumerate() {
                let y = MARGIN + r as u32 * (self.row_height + GAP) + self.row_height / 2;
                root.draw_text(label, &label_style, (MARGIN as i32, y as i32))
                    .map_err(|e| anyhow!("drawing label `{label}` of {}: {e}", path.display()))?;
            }
            let caption_style = self
                .caption_font
                .color(&BLACK)
                .pos(Pos::new(HPos::Left, VPos::Top));
            let at = (MARGIN as i32, self.caption_y as i32);
            root.draw_text(self.note, &caption_style, at)
                .map_err(|e| anyhow!("drawing the caption of {}: {e}", path.display()))?;
            root.present()
                .map_err(|e| anyhow!("drawing {}: {e}", path.display()))?;
        }
        RgbImage::from_raw(width, height, buf)
            .with_context(|| format!("assembling {} ({width}x{height})", path.display()))
    }
}

/// Width and height of `text` in `font`, in pixels.
fn text_size(font: &FontDesc, text: &str) -> Result<(u32, u32)> {
    font.box_size(text)
        .map_err(|e| anyhow!("measuring the text `{text}`: {e}"))
}

/// Encodes `img` as PNG and writes it atomically.
pub(crate) fn write_png(path: &Path, img: &RgbImage) -> Result<()> {
    let mut bytes = Vec::new();
    img.write_to(
        &mut std::io::Cursor::new(&mut bytes),
        image::ImageOutputFormat::Png,
    )
    .with_context(|| format!("encoding {}", path.display()))?;
    write_atomic(path, &bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::Rgb;

    fn solid(w: u32, h: u32, c: [u8; 3]) -> RgbImage {
        RgbImage::from_pixel(w, h, Rgb(c))
    }

    #[test]
    fn grid_has_a_cell_per_image_and_text() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("fig.png");
        let rows = vec![
            (
                "original",
                vec![solid(16, 16, [255, 0, 0]), solid(16, 16, [0, 255, 0])],
            ),
            (
                "masked",
                vec![solid(16, 16, [0, 0, 255]), solid(16, 16, [128, 128, 128])],
            ),
        ];
        reconstruction_figure(&path, &rows, "a caption").unwrap();
        let img = image::open(&path).unwrap().to_rgb8();
        // 16 px images are upscaled 6x to 96 px cells.
        assert!(img.width() >= 2 * 96 + GAP && img.height() >= 2 * 96 + GAP);
        let (w, h) = img.dimensions();
        // The bottom-right cell is the grey image, nearest-upscaled (uniform).
        let x = w - MARGIN - 96;
        let y = MARGIN + 96 + GAP;
        assert_eq!(img.get_pixel(x, y), &Rgb([128, 128, 128]));
        assert_eq!(img.get_pixel(x + 95, y + 95), &Rgb([128, 128, 128]));
        assert_eq!(img.get_pixel(x - GAP - 1, y - GAP - 1), &Rgb([255, 0, 0]));
        // Labels and caption put dark pixels in the left column and the bottom band.
        let dark = |x0: u32, x1: u32, y0: u32, y1: u32| {
            (x0..x1)
                .flat_map(|x| (y0..y1).map(move |y| (x, y)))
                .any(|(x, y)| img.get_pixel(x, y)[0] < 100 && img.get_pixel(x, y)[1] < 100)
        };
        assert!(dark(0, MARGIN + 40, MARGIN, MARGIN + 96), "no label text");
        assert!(dark(0, w, MARGIN + 2 * 96 + GAP, h), "no caption text");
    }

    #[test]
    fn ragged_rows_are_an_error() {
        let tmp = tempfile::tempdir().unwrap();
        let rows = vec![
            ("a", vec![solid(8, 8, [0; 3]), solid(8, 8, [0; 3])]),
            ("b", vec![solid(8, 8, [0; 3])]),
        ];
        let e = reconstruction_figure(&tmp.path().join("f.png"), &rows, "").unwrap_err();
        assert!(format!("{e:#}").contains("row `b`"), "{e:#}");
        let e = reconstruction_figure(&tmp.path().join("f.png"), &[], "").unwrap_err();
        assert!(format!("{e:#}").contains("no rows"), "{e:#}");
    }
}
