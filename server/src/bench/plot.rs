//! `--plot OUT.png`: acceptance by depth and per-prompt speedup.

use std::path::Path;

use anyhow::{Context, Result, anyhow};
use plotters::prelude::*;

use super::report::Report;

/// Common places of a TrueType font (plotters draws text with ab_glyph from font bytes).
const FONTS: [&str; 4] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/System/Library/Fonts/Supplemental/Arial.ttf",
];

fn register_font() -> Result<()> {
    let path = std::env::var("ARBOR_FONT")
        .ok()
        .or_else(|| {
            FONTS
                .iter()
                .find(|p| Path::new(p).exists())
                .map(|p| (*p).to_string())
        })
        .context("--plot needs a TrueType font: install fonts-dejavu-core or set ARBOR_FONT")?;
    let bytes = std::fs::read(&path).with_context(|| format!("reading font {path}"))?;
    // plotters keeps registered fonts for the process lifetime.
    let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
    plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
        .map_err(|_| anyhow!("{path} is not a usable TrueType font"))
}

/// Draws the two panels into a PNG at `out`.
pub fn draw(r: &Report, out: &Path) -> Result<()> {
    register_font()?;
    let root = BitMapBackend::new(out, (1200, 500)).into_drawing_area();
    root.fill(&WHITE)?;
    let (left, right) = root.split_horizontally(500);

    let depths = &r.overall.per_depth;
    let mut c = ChartBuilder::on(&left)
        .caption("acceptance by depth", ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(50)
        .build_cartesian_2d(0.5f64..depths.len().max(1) as f64 + 0.5, 0.0f64..1.0)?;
    let whole = |x: &f64| {
        if x.fract() == 0.0 {
            format!("{x:.0}")
        } else {
            String::new()
        }
    };
    c.configure_mesh()
        .x_desc("depth")
        .x_label_formatter(&whole)
        .y_desc("accepted / tried")
        .disable_x_mesh()
        .draw()?;
    c.draw_series(depths.iter().map(|d| {
        let x = d.depth as f64;
        Rectangle::new([(x - 0.4, 0.0), (x + 0.4, d.alpha)], BLUE.mix(0.6).filled())
    }))?;

    let n = r.prompts.len();
    let top = r
        .prompts
        .iter()
        .map(|p| p.figures.speedup)
        .fold(1.5f64, f64::max)
        * 1.1;
    let mut c = ChartBuilder::on(&right)
        .caption(
            format!(
                "speedup over plain decoding per prompt (overall {:.2}x, tau {:.2})",
                r.overall.speedup, r.overall.tau
            ),
            ("sans-serif", 22),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(50)
        .build_cartesian_2d(-0.5f64..n.max(1) as f64 - 0.5, 0.0f64..top)?;
    c.configure_mesh()
        .x_desc("prompt")
        .x_label_formatter(&whole)
        .y_desc("spec tok/s / plain tok/s")
        .disable_x_mesh()
        .draw()?;
    c.draw_series(r.prompts.iter().enumerate().map(|(i, p)| {
        let color = if p.figures.speedup >= 1.0 { GREEN } else { RED };
        let x = i as f64;
        Rectangle::new(
            [(x - 0.4, 0.0), (x + 0.4, p.figures.speedup)],
            color.mix(0.6).filled(),
        )
    }))?;
    c.draw_series(LineSeries::new(
        [(-0.5, 1.0), (n.max(1) as f64 - 0.5, 1.0)],
        BLACK,
    ))?;
    root.present()
        .with_context(|| format!("writing {}", out.display()))?;
    Ok(())
}
