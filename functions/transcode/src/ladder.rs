//! Which rungs run, at what size: never upscale, keep the aspect ratio, even dimensions.

use serde::Serialize;

use crate::probe::Source;
use crate::request::Rung;

/// A rung that will be encoded.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Planned {
    pub name: String,
    pub width: u32,
    pub height: u32,
    pub bitrate_kbps: u32,
    /// Every rung was taller than the source, so the smallest one is encoded at the
    /// source's own size instead (`min_one_rendition`).
    pub clamped_to_source: bool,
}

/// A rung left out, and why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Skipped {
    pub name: String,
    pub height: u32,
    pub reason: String,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    pub rungs: Vec<Planned>,
    pub skipped: Vec<Skipped>,
}

/// The nearest even number, at least 2.
pub fn even(x: f64) -> u32 {
    (((x / 2.0).round() as u32) * 2).max(2)
}

/// The output size for a short side of `short` pixels, keeping the display aspect ratio.
pub fn size_for(short: u32, display_w: u32, display_h: u32) -> (u32, u32) {
    let (w, h) = (f64::from(display_w), f64::from(display_h));
    if display_w >= display_h {
        (even(f64::from(short) * w / h), short)
    } else {
        (short, even(f64::from(short) * h / w))
    }
}

/// Chooses the rungs for this source. `ladder` is sorted by height.
pub fn plan(source: &Source, ladder: &[Rung], min_one_rendition: bool) -> Plan {
    let (dw, dh) = (source.display_width, source.display_height);
    let short = dw.min(dh);
    let mut plan = Plan::default();
    for r in ladder {
        if r.height > short {
            plan.skipped.push(Skipped {
                name: r.name.clone(),
                height: r.height,
                reason: format!(
                    "{} px is more than the source's {short} px ({dw}x{dh}): never upscaled",
                    r.height
                ),
            });
        } else {
            let (width, height) = size_for(r.height, dw, dh);
            plan.rungs.push(Planned {
                name: r.name.clone(),
                width,
                height,
                bitrate_kbps: r.bitrate_kbps,
                clamped_to_source: false,
            });
        }
    }
    if plan.rungs.is_empty()
        && min_one_rendition
        && let Some(first) = ladder.first()
    {
        // The source is smaller than every rung: deliver the smallest rung at the
        // source's own size (rounded down to even) rather than nothing.
        let short = (short / 2 * 2).max(2);
        let (width, height) = size_for(short, dw, dh);
        plan.skipped.retain(|s| s.name != first.name);
        plan.rungs.push(Planned {
            name: first.name.clone(),
            width,
            height,
            bitrate_kbps: first.bitrate_kbps,
            clamped_to_source: true,
        });
    }
    plan
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::request::default_ladder;

    fn src(w: u32, h: u32) -> Source {
        Source {
            video_codec: "h264".into(),
            width: w,
            height: h,
            display_width: w,
            display_height: h,
            pix_fmt: "yuv420p".into(),
            frame_rate: "30/1".into(),
            fps: 30.0,
            frames: None,
            duration_s: 4.0,
            has_audio: true,
            rotation: 0,
        }
    }

    fn sizes(p: &Plan) -> Vec<(&str, u32, u32)> {
        p.rungs
            .iter()
            .map(|r| (r.name.as_str(), r.width, r.height))
            .collect()
    }

    #[test]
    fn a_1080p_source_gets_the_whole_ladder() {
        let p = plan(&src(1920, 1080), &default_ladder(), true);
        assert_eq!(
            sizes(&p),
            vec![
                ("480p", 854, 480),
                ("720p", 1280, 720),
                ("1080p", 1920, 1080)
            ]
        );
        assert!(p.skipped.is_empty());
        assert_eq!(p.rungs[2].bitrate_kbps, 3000);
    }

    #[test]
    fn taller_rungs_are_skipped_never_upscaled() {
        let p = plan(&src(1280, 720), &default_ladder(), true);
        assert_eq!(sizes(&p), vec![("480p", 854, 480), ("720p", 1280, 720)]);
        assert_eq!(p.skipped.len(), 1);
        assert_eq!(p.skipped[0].name, "1080p");
        assert!(p.skipped[0].reason.contains("never upscaled"));
    }

    #[test]
    fn a_source_below_every_rung_gets_the_smallest_at_its_own_size() {
        let p = plan(&src(640, 360), &default_ladder(), true);
        assert_eq!(sizes(&p), vec![("480p", 640, 360)]);
        assert!(p.rungs[0].clamped_to_source);
        let skipped: Vec<_> = p.skipped.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(skipped, vec!["720p", "1080p"]);

        let none = plan(&src(640, 360), &default_ladder(), false);
        assert!(none.rungs.is_empty());
        assert_eq!(none.skipped.len(), 3);

        // Odd sizes are rounded down to even, never up.
        let odd = plan(&src(641, 361), &default_ladder(), true);
        assert_eq!(sizes(&odd), vec![("480p", 640, 360)]);
    }

    #[test]
    fn dimensions_are_even_and_keep_the_aspect_ratio() {
        for (w, h) in [
            (1920, 1080),
            (1440, 1080),
            (1920, 800),
            (1998, 1080),
            (4096, 2160),
        ] {
            let p = plan(&src(w, h), &default_ladder(), true);
            for r in &p.rungs {
                assert_eq!(r.width % 2, 0, "{w}x{h} → {r:?}");
                assert_eq!(r.height % 2, 0, "{w}x{h} → {r:?}");
                let want = f64::from(w) / f64::from(h);
                let got = f64::from(r.width) / f64::from(r.height);
                // Rounding to even moves the width by at most one pixel.
                assert!(
                    (got - want).abs() <= 1.0 / f64::from(r.height),
                    "{w}x{h} → {r:?}"
                );
            }
        }
        // 2.4:1 at 720p: 1728x720.
        assert_eq!(size_for(720, 1920, 800), (1728, 720));
    }

    #[test]
    fn portrait_video_uses_the_short_side() {
        let p = plan(&src(1080, 1920), &default_ladder(), true);
        assert_eq!(
            sizes(&p),
            vec![
                ("480p", 480, 854),
                ("720p", 720, 1280),
                ("1080p", 1080, 1920)
            ]
        );
    }
}
