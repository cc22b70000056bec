//! Analytic FLOP count of the network (2 per multiply-add; convolutions and
//! the OCR matrix products; BN, ReLU, resizes and softmax left out), walking
//! the same structure as `hrnet.rs` and `ocr.rs` build.

use super::{Fusion, ModelConfig};
use crate::Result;
use hmsa_kernels::resize::scaled_size;

/// FLOPs of one forward at 1.0x and of the configured multi-scale forward.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Flops {
    pub single: u64,
    pub fused: u64,
}

fn conv(cin: usize, cout: usize, k: usize, hw: (usize, usize)) -> u64 {
    2 * (cin * k * k * cout * hw.0 * hw.1) as u64
}

fn half(hw: (usize, usize)) -> (usize, usize) {
    // 3x3, stride 2, padding 1
    ((hw.0 - 1) / 2 + 1, (hw.1 - 1) / 2 + 1)
}

/// Backbone + OCR (+ the relative attention head when `attn`) at (h, w).
fn per_scale(cfg: &ModelConfig, h: usize, w: usize, attn: bool) -> u64 {
    let b = &cfg.backbone;
    let s = b.stem_width;
    let r1 = half((h, w));
    let r0 = half(r1);
    let mut f = conv(3, s, 3, r1) + conv(s, s, 3, r0);
    let (p, mut cin) = (b.layer1_planes, s);
    for _ in 0..b.layer1_blocks {
        f += conv(cin, p, 1, r0) + conv(p, p, 3, r0) + conv(p, 4 * p, 1, r0);
        if cin != 4 * p {
            f += conv(cin, 4 * p, 1, r0);
        }
        cin = 4 * p;
    }
    let mut res = vec![r0];
    for _ in 1..4 {
        res.push(half(*res.last().expect("non-empty")));
    }
    let mut pre = vec![cin];
    for st in 0..3 {
        let cur = &b.widths[..st + 2];
        for (i, &c) in cur.iter().enumerate() {
            if i < pre.len() {
                if pre[i] != c {
                    f += conv(pre[i], c, 3, res[i]);
                }
            } else {
                let last = *pre.last().expect("non-empty");
                let steps = i + 1 - pre.len();
                for j in 0..steps {
                    let cout = if j + 1 == steps { c } else { last };
                    f += conv(last, cout, 3, res[pre.len() + j]);
                }
            }
        }
        for _ in 0..b.modules[st] {
            for (i, &c) in cur.iter().enumerate() {
                f += 2 * b.blocks[st] as u64 * conv(c, c, 3, res[i]);
            }
            for i in 0..cur.len() {
                for j in 0..cur.len() {
                    if j > i {
                        f += conv(cur[j], cur[i], 1, res[j]);
                    } else if j < i {
                        for k in 0..i - j {
                            let cout = if k + 1 == i - j { cur[i] } else { cur[j] };
                            f += conv(cur[j], cout, 3, res[j + k + 1]);
                        }
                    }
                }
            }
        }
        pre = cur.to_vec();
    }
    let high = b.out_channels();
    let (mid, key, k) = (cfg.ocr_mid_channels, cfg.ocr_key_channels, cfg.num_classes);
    let px = (r0.0 * r0.1) as u64;
    f += conv(high, mid, 3, r0) + conv(high, high, 1, r0) + conv(high, k, 1, r0);
    f += 2 * (k * mid) as u64 * px; // gather
    f += conv(mid, key, 1, r0) + conv(key, key, 1, r0); // f_pixel
    f += conv(mid, key, 1, (k, 1)) + conv(key, key, 1, (k, 1)) + conv(mid, key, 1, (k, 1));
    f += 2 * 2 * (k * key) as u64 * px; // similarity and context
    f += conv(key, mid, 1, r0) + conv(2 * mid, mid, 1, r0) + conv(mid, k, 1, r0);
    if attn {
        let bot = cfg.attn_bottleneck;
        f += conv(mid, bot, 3, r0) + conv(bot, bot, 3, r0) + conv(bot, 1, 1, r0);
    }
    f
}

/// FLOPs at an (h, w) input for 1.0x alone and for the config's fusion.
pub fn count(cfg: &ModelConfig, h: usize, w: usize) -> Result<Flops> {
    cfg.validate()?;
    let single = per_scale(cfg, h, w, false);
    let mut fused = 0;
    // high to low
    for (i, &s) in cfg.scales.iter().rev().enumerate() {
        let (hs, ws) = scaled_size(h, w, s);
        fused += per_scale(cfg, hs, ws, cfg.fusion == Fusion::Hierarchical && i > 0);
    }
    if cfg.fusion == Fusion::Explicit {
        let r0 = half(half((h, w)));
        let (n, bot) = (cfg.scales.len(), cfg.attn_bottleneck);
        fused += conv(cfg.ocr_mid_channels * n, bot, 3, r0) + conv(bot, bot, 3, r0) + conv(bot, n, 1, r0);
    }
    Ok(Flops { single, fused })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn half_scale_costs_about_a_quarter_and_hierarchical_adds_it() {
        let mut cfg = ModelConfig::small();
        cfg.fusion = Fusion::Single;
        cfg.scales = [1.0].into();
        let one = count(&cfg, 256, 512).unwrap().single;
        let half = count(&cfg, 128, 256).unwrap().single;
        let r = half as f64 / one as f64;
        assert!((0.24..0.27).contains(&r), "0.5x / 1.0x = {r}");
        cfg.fusion = Fusion::Hierarchical;
        cfg.scales = [0.5, 1.0].into();
        let h = count(&cfg, 256, 512).unwrap().fused;
        // one 1.0x pass + one 0.5x pass + the 0.5x attention head (32 bottleneck,
        // 64 in): 2·(64·9·32 + 32·9·32 + 32)·(32·64) FLOPs at the 0.5x 1/4 map.
        let head: u64 = 2 * (64 * 9 * 32 + 32 * 9 * 32 + 32) * (32 * 64);
        assert_eq!(h, one + half + head);
    }
}
