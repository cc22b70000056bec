//! Scale fusion: one enum, one `fuse`, used by training and inference alike.
//!
//! Every rule takes the per-scale outputs of the shared network (logits `L_s`,
//! aux logits `A_s`, kept at 1/4 of the scale's input and read at that input
//! size, as the official `scale_as` does, or composed straight to another
//! size) and returns one prediction at the 1.0x input resolution; the aux
//! logits go through the same rule in training only (the loss reads them):
//! - `Single`: the one scale, resized to the output size.
//! - `Average` / `Max`: mean / per-pixel max of the softmax probabilities of
//!   every scale resized to the output; returned as log-probabilities.
//! - `Hierarchical`: the paper's recurrence, scales high to low (1.0 required):
//!   first `P = L_s`; then for `s >= 1`: `P = a_s·L_s + (1 − a_s)·resize(P)`;
//!   for `s < 1`: `P = up(a_s·L_s) + (1 − up(a_s))·P` (one op,
//!   `blend::add_rest_up`, with every resize inside it).
//! - `Explicit`: every scale's OCR features resized to the 1.0x feature map and
//!   concatenated, one head gives a channel per scale, softmax across scales,
//!   weighted sum of the predictions resized to 1.0x.

use super::ocr::AttnHead;
use super::scales::{format_scale, Scales};
use crate::{Error, Result};
use candle_core::{ModuleT, Tensor};
use hmsa_kernels::blend;
use hmsa_kernels::resize::{resize, resize_via};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// How predictions at several scales become one.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum Fusion {
    Single,
    Average,
    Max,
    Explicit,
    Hierarchical,
}

impl Fusion {
    pub const ALL: [Fusion; 5] = [
        Fusion::Single,
        Fusion::Average,
        Fusion::Max,
        Fusion::Explicit,
        Fusion::Hierarchical,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Fusion::Single => "single",
            Fusion::Average => "average",
            Fusion::Max => "max",
            Fusion::Explicit => "explicit",
            Fusion::Hierarchical => "hierarchical",
        }
    }

    /// Whether the per-scale forward must compute the one-channel attention.
    pub fn needs_relative_attention(self) -> bool {
        self == Fusion::Hierarchical
    }

    /// Checks a scale set against this rule; `field` names it in the error.
    pub fn check_scales(self, scales: &[f64], field: &str) -> Result<()> {
        if scales.is_empty() {
            return Err(Error::invalid(field, "the scale set is empty"));
        }
        for (i, &s) in scales.iter().enumerate() {
            if !(s.is_finite() && s > 0.0) {
                return Err(Error::invalid(
                    field,
                    format!("scale {s} is not a positive number"),
                ));
            }
            if !(1.0 / 64.0..=8.0).contains(&s) {
                return Err(Error::invalid(field, format!("scale {s} is not in 1/64..=8")));
            }
            if scales[..i].contains(&s) {
                return Err(Error::invalid(field, format!("scale {s} is listed twice")));
            }
        }
        match self {
            Fusion::Single if scales.len() != 1 => Err(Error::invalid(
                field,
                format!("single-scale fusion takes one scale, got {}", scales.len()),
            )),
            Fusion::Hierarchical | Fusion::Explicit if !scales.contains(&1.0) => Err(Error::invalid(
                field,
                format!(
                    "{} fusion needs 1.0 in the scale set (got {})",
                    self.name(),
                    Scales::new(scales.to_vec())
                ),
            )),
            _ => Ok(()),
        }
    }
}

impl fmt::Display for Fusion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Fusion {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        Fusion::ALL
            .into_iter()
            .find(|f| f.name() == s)
            .ok_or_else(|| format!("unknown fusion `{s}` (single, average, max, explicit, hierarchical)"))
    }
}

/// What one forward pass of the shared network gives at one scale.
///
/// The logits are kept as the network gives them, at 1/4 of the scale's
/// input size; [`ScaleOutput::pred`] reads them at the input size (the
/// official `scale_as(cls_out, x)`), and [`ScaleOutput::pred_at`] at any
/// other size in one resize, without making the input-size map first.
#[derive(Debug, Clone)]
pub struct ScaleOutput {
    pub scale: f64,
    /// This scale's input size (H_s, W_s).
    pub size: (usize, usize),
    /// Semantic logits (N, K, h, w) at the network's output resolution.
    pub cls: Tensor,
    /// Auxiliary logits, same shape.
    pub aux: Tensor,
    /// Relative attention `sigmoid(h(x_s))` (N, 1, H_s, W_s), when computed.
    pub attn: Option<Tensor>,
    /// OCR features (N, mid, H_s/4, W_s/4), read by explicit attention.
    pub feats: Tensor,
}

impl ScaleOutput {
    /// Semantic logits (N, K, H_s, W_s) at this scale's input size.
    pub fn pred(&self) -> Result<Tensor> {
        Ok(resize(&self.cls, self.size.0, self.size.1)?)
    }

    /// [`Self::pred`] resized to `hw`, as one resize.
    pub fn pred_at(&self, hw: (usize, usize)) -> Result<Tensor> {
        Ok(resize_via(&self.cls, self.size, hw)?)
    }

    /// Auxiliary logits at this scale's input size.
    pub fn aux_pred(&self) -> Result<Tensor> {
        Ok(resize(&self.aux, self.size.0, self.size.1)?)
    }

    /// [`Self::aux_pred`] resized to `hw`, as one resize.
    pub fn aux_at(&self, hw: (usize, usize)) -> Result<Tensor> {
        Ok(resize_via(&self.aux, self.size, hw)?)
    }
}

/// The fused result.
#[derive(Debug, Clone)]
pub struct Fused {
    /// (N, K, H, W) at the 1.0x input resolution; logits for single,
    /// hierarchical and explicit fusion, log-probabilities for average and max.
    pub pred: Tensor,
    /// The auxiliary logits fused the same way, in training only (the loss
    /// reads them; inference has no use for them and skips the work).
    pub aux: Option<Tensor>,
    /// Per scale (high to low), the weight map the fusion gave that scale's
    /// prediction, at that scale's input resolution (empty for the baselines).
    pub attn: Vec<(f64, Tensor)>,
}

fn sorted_high_to_low(outs: &[ScaleOutput]) -> Vec<&ScaleOutput> {
    let mut v: Vec<&ScaleOutput> = outs.iter().collect();
    v.sort_by(|a, b| b.scale.total_cmp(&a.scale));
    v
}

impl Fusion {
    /// Fuses per-scale outputs into a prediction of size `out_hw`.
    /// `explicit` is the explicit-attention head (only for `Explicit`).
    pub fn fuse(
        self,
        outs: &[ScaleOutput],
        out_hw: (usize, usize),
        explicit: Option<&AttnHead>,
        train: bool,
    ) -> Result<Fused> {
        let scales: Vec<f64> = outs.iter().map(|o| o.scale).collect();
        self.check_scales(&scales, "scales")?;
        let outs = sorted_high_to_low(outs);
        // the aux logits go through the same fusion, in training only
        let aux = |f: &dyn Fn(Part) -> Result<Tensor>| -> Result<Option<Tensor>> {
            train.then(|| f(Part::Aux)).transpose()
        };
        match self {
            Fusion::Single => {
                let o = outs[0];
                let f = |p: Part| p.at(o, out_hw);
                Ok(Fused {
                    pred: f(Part::Pred)?,
                    aux: aux(&f)?,
                    attn: vec![],
                })
            }
            Fusion::Average | Fusion::Max => {
                let reduce = |part: Part| -> Result<Tensor> {
                    // Pairwise element-wise sums / maxima: candle's reduction
                    // over a stacked leading dim takes its slow strided path.
                    let mut acc: Option<Tensor> = None;
                    for o in &outs {
                        let p = blend::softmax_channels(&part.at(o, out_hw)?)?;
                        acc = Some(match acc {
                            None => p,
                            Some(a) if self == Fusion::Average => (a + p)?,
                            Some(a) => a.maximum(&p)?,
                        });
                    }
                    let p = acc.expect("at least one scale");
                    let p = if self == Fusion::Average {
                        (p / outs.len() as f64)?
                    } else {
                        p
                    };
                    Ok(p.log()?)
                };
                Ok(Fused {
                    pred: reduce(Part::Pred)?,
                    aux: aux(&reduce)?,
                    attn: vec![],
                })
            }
            Fusion::Hierarchical => {
                let parts: &[Part] = if train {
                    &[Part::Pred, Part::Aux]
                } else {
                    &[Part::Pred]
                };
                let mut fused = hierarchical(&outs, parts)?.into_iter();
                Ok(Fused {
                    pred: fused.next().expect("one per part"),
                    aux: fused.next(),
                    attn: outs[1..]
                        .iter()
                        .map(|o| Ok((o.scale, attn_of(o)?)))
                        .collect::<Result<_>>()?,
                })
            }
            Fusion::Explicit => {
                let head = explicit.ok_or_else(|| {
                    Error::invalid(
                        "model.fusion",
                        "explicit fusion needs a model built for explicit attention",
                    )
                })?;
                explicit_fuse(&outs, head, out_hw, train)
            }
        }
    }
}

/// Which logits a fusion combines.
#[derive(Clone, Copy)]
enum Part {
    Pred,
    Aux,
}

impl Part {
    /// The logits as the network gives them.
    fn logits(self, o: &ScaleOutput) -> &Tensor {
        match self {
            Part::Pred => &o.cls,
            Part::Aux => &o.aux,
        }
    }

    fn input_size(self, o: &ScaleOutput) -> Result<Tensor> {
        match self {
            Part::Pred => o.pred(),
            Part::Aux => o.aux_pred(),
        }
    }

    fn at(self, o: &ScaleOutput, hw: (usize, usize)) -> Result<Tensor> {
        match self {
            Part::Pred => o.pred_at(hw),
            Part::Aux => o.aux_at(hw),
        }
    }
}

fn attn_of(o: &ScaleOutput) -> Result<Tensor> {
    o.attn.clone().ok_or_else(|| {
        Error::invalid(
            "fusion",
            format!(
                "hierarchical fusion needs the attention of scale {}",
                format_scale(o.scale)
            ),
        )
    })
}

/// The recurrence over scales sorted high to low, for each of `parts`
/// (the prediction, and in training the aux logits). The running
/// prediction starts as the highest scale's logits at the network's
/// resolution, kept unmade until a blend needs them, so that bringing them
/// to the next scale is one resize (or, below 1.0, part of
/// `blend::add_rest_up`, which also brings up each part's attention map
/// itself: one channel, cheaper to redo than to keep).
fn hierarchical(outs: &[&ScaleOutput], parts: &[Part]) -> Result<Vec<Tensor>> {
    let first = outs[0];
    let mut preds: Vec<Option<Tensor>> = vec![None; parts.len()];
    let mut size = first.size;
    for o in &outs[1..] {
        let a = attn_of(o)?;
        if o.scale >= 1.0 {
            // Bring the running prediction down to this scale, then blend.
            for (part, pred) in parts.iter().zip(&mut preds) {
                let low = match pred {
                    None => part.at(first, o.size)?,
                    Some(p) => resize(p, o.size.0, o.size.1)?,
                };
                *pred = Some(blend::mix(&part.input_size(o)?, &low, &a)?);
            }
            size = o.size;
        } else {
            // Weight this (lower) scale at its own resolution, bring it up
            // and add the rest of the running prediction, in one op that
            // also brings this scale's logits to its input size and the
            // highest scale's logits up when they are the running
            // prediction still.
            for (part, pred) in parts.iter().zip(&mut preds) {
                let high = match pred.take() {
                    None => part.logits(first).clone(),
                    Some(p) => p,
                };
                *pred = Some(blend::add_rest_up(part.logits(o), &high, &a, size)?);
            }
        }
    }
    parts
        .iter()
        .zip(preds)
        .map(|(part, pred)| match pred {
            Some(p) => Ok(p),
            None => part.input_size(first),
        })
        .collect()
}

fn explicit_fuse(
    outs: &[&ScaleOutput],
    head: &AttnHead,
    out_hw: (usize, usize),
    train: bool,
) -> Result<Fused> {
    let (oh, ow) = out_hw;
    let one = outs
        .iter()
        .find(|o| o.scale == 1.0)
        .expect("checked: 1.0 present");
    let (_, _, fh, fw) = one.feats.dims4()?;
    let feats = outs
        .iter()
        .map(|o| resize(&o.feats, fh, fw))
        .collect::<candle_core::Result<Vec<_>>>()?;
    // (N, S·mid, h, w) -> (N, S, h, w), softmax across scales
    let logits = head.forward_t(&Tensor::cat(&feats, 1)?, train)?;
    let n_out = logits.dim(1)?;
    if n_out != outs.len() {
        return Err(Error::invalid(
            "scales",
            format!(
                "the explicit attention head was built for {n_out} scales, got {}",
                outs.len()
            ),
        ));
    }
    let weights = resize(&blend::softmax_channels(&logits)?, oh, ow)?;
    let mut pred: Option<Tensor> = None;
    let mut aux: Option<Tensor> = None;
    let mut attn = vec![];
    for (i, o) in outs.iter().enumerate() {
        let w = weights.narrow(1, i, 1)?;
        let p = blend::weight(&o.pred_at(out_hw)?, &w)?;
        pred = Some(match pred {
            None => p,
            Some(acc) => (acc + p)?,
        });
        if train {
            let a = blend::weight(&o.aux_at(out_hw)?, &w)?;
            aux = Some(match aux {
                None => a,
                Some(acc) => (acc + a)?,
            });
        }
        attn.push((o.scale, resize(&w, o.size.0, o.size.1)?));
    }
    Ok(Fused {
        pred: pred.expect("at least one scale"),
        aux,
        attn,
    })
}

/// Averages a fused prediction with the one of the flipped input (already
/// flipped back): log of the mean of the two softmax distributions.
pub fn average_flip(a: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
    let pa = blend::softmax_channels(a)?;
    let pb = blend::softmax_channels(b)?;
    ((pa + pb)? * 0.5)?.log()
}

/// Class index per pixel: (N, K, H, W) -> (N, H, W) u32.
pub fn argmax_classes(pred: &Tensor) -> candle_core::Result<Tensor> {
    pred.argmax(1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// A (1, 2, h, w) logit map: channel 0 holds `v`, channel 1 holds `-v`, so
    /// the attention must broadcast across channels.
    fn logits(v: &[f64], h: usize, w: usize) -> Tensor {
        let neg: Vec<f64> = v.iter().map(|x| -x).collect();
        Tensor::from_slice(&[v, &neg[..]].concat(), (1, 2, h, w), &Device::Cpu).unwrap()
    }

    fn map(v: &[f64], h: usize, w: usize) -> Tensor {
        Tensor::from_slice(v, (1, 1, h, w), &Device::Cpu).unwrap()
    }

    fn konst(v: f64, c: usize, h: usize, w: usize) -> Tensor {
        Tensor::full(v, (1, c, h, w), &Device::Cpu).unwrap()
    }

    /// Aux logits are 10x the logits: the recurrence is linear in the logits
    /// for fixed attention, so the fused aux must be 10x the fused prediction.
    /// Logits given at the scale's input size (the network's 1/4 resolution
    /// is `network_logits_are_read_at_the_input_size_then_resized`'s case).
    fn out(scale: f64, pred: Tensor, attn: Option<Tensor>) -> ScaleOutput {
        let (_, _, h, w) = pred.dims4().unwrap();
        ScaleOutput {
            scale,
            size: (h, w),
            aux: (&pred * 10.0).unwrap(),
            cls: pred,
            attn,
            feats: konst(0.0, 1, 1, 1),
        }
    }

    fn vals(t: &Tensor) -> Vec<f64> {
        t.flatten_all().unwrap().to_vec1().unwrap()
    }

    /// Checks the fused prediction, and in training the fused aux.
    fn check(fused: &Fused, want_ch0: &[f64]) {
        let p = vals(&fused.pred);
        let a = fused.aux.as_ref().map(vals);
        let n = want_ch0.len();
        for i in 0..n {
            assert!(
                (p[i] - want_ch0[i]).abs() < 1e-12,
                "pixel {i}: {} vs {}",
                p[i],
                want_ch0[i]
            );
            assert!((p[n + i] + want_ch0[i]).abs() < 1e-12, "channel 1, pixel {i}");
            if let Some(a) = &a {
                assert!((a[i] - 10.0 * want_ch0[i]).abs() < 1e-10, "aux pixel {i}");
            }
        }
    }

    #[test]
    fn hierarchical_two_scales_by_hand() {
        // P = up(a·L_0.5) + (1 − up(a))·L_1 with a = 0.25, L_0.5 = 8:
        // 2 + 0.75·L_1.
        let outs = [
            out(1.0, logits(&[1., 2., 3., 4.], 2, 2), None),
            out(0.5, logits(&[8.], 1, 1), Some(map(&[0.25], 1, 1))),
        ];
        for train in [false, true] {
            let f = Fusion::Hierarchical.fuse(&outs, (2, 2), None, train).unwrap();
            assert_eq!(f.aux.is_some(), train, "the aux is fused in training only");
            check(&f, &[2.75, 3.5, 4.25, 5.0]);
            assert_eq!(f.attn.len(), 1);
        }
    }

    #[test]
    fn hierarchical_three_scales_both_branches_by_hand() {
        // 2.0x (4x4) first; its 2x2 block means are 2, 4, 8, 6 (a 4 -> 2
        // bilinear resize samples at 0.5 and 2.5: the mean of each pair).
        #[rustfmt::skip]
        let l2 = [0., 2., 4., 4.,
                  2., 4., 4., 4.,
                  8., 8., 6., 6.,
                  8., 8., 6., 6.];
        let a1 = [0.5, 1.0, 0.0, 0.25];
        // s = 1.0: a·L_1 + (1 − a)·[2, 4, 8, 6] = [1.5, 2, 8, 5.5]
        // s = 0.5: 0.25·8 + 0.75·that = [3.125, 3.5, 8, 6.125]
        // Order of the input list must not matter.
        let outs = [
            out(0.5, logits(&[8.], 1, 1), Some(map(&[0.25], 1, 1))),
            out(2.0, logits(&l2, 4, 4), None),
            out(1.0, logits(&[1., 2., 3., 4.], 2, 2), Some(map(&a1, 2, 2))),
        ];
        for train in [false, true] {
            let f = Fusion::Hierarchical.fuse(&outs, (2, 2), None, train).unwrap();
            assert_eq!(f.aux.is_some(), train, "the aux is fused in training only");
            check(&f, &[3.125, 3.5, 8.0, 6.125]);
            let order: Vec<f64> = f.attn.iter().map(|(s, _)| *s).collect();
            assert_eq!(order, vec![1.0, 0.5]);
        }
    }

    #[test]
    fn hierarchical_four_scales_by_hand() {
        // 1.0x is 8x8. 2.0: L = 4. 1.0: a = 0.5, L = 2 -> 3.
        // 0.5: a = 0.5, L = 6 -> 3 + 0.5·3 = 4.5. 0.25: a = 0.2, L = 10 -> 2 + 0.8·4.5 = 5.6.
        let l = |v: f64, n: usize| {
            let t = konst(v, 1, n, n);
            Tensor::cat(&[&t, &t.neg().unwrap()], 1).unwrap()
        };
        let outs = [
            out(2.0, l(4.0, 16), None),
            out(1.0, l(2.0, 8), Some(konst(0.5, 1, 8, 8))),
            out(0.5, l(6.0, 4), Some(konst(0.5, 1, 4, 4))),
            out(0.25, l(10.0, 2), Some(konst(0.2, 1, 2, 2))),
        ];
        for train in [false, true] {
            let f = Fusion::Hierarchical.fuse(&outs, (8, 8), None, train).unwrap();
            assert_eq!(f.aux.is_some(), train, "the aux is fused in training only");
            check(&f, &[5.6; 64]);
        }
    }

    /// Per-scale logits as the network gives them (1/4 of the scale's input
    /// size) fuse as the official code does: each upsampled to its input
    /// size first, the hierarchical blends there, the highest scale brought
    /// down (and every scale, for averaging) by resizing that map again.
    #[test]
    fn network_logits_are_read_at_the_input_size_then_resized() {
        let dev = Device::Cpu;
        let rnd = |c: usize, h: usize, w: usize, seed: u64| {
            let n = c * h * w;
            let v: Vec<f64> = (0..n)
                .map(|i| ((i as u64 * 7919 + seed * 104729) % 1000) as f64 / 250.0 - 2.0)
                .collect();
            Tensor::from_vec(v, (1, c, h, w), &dev).unwrap()
        };
        // input 24x40 at 1.0; scales 2.0 (48x80), 1.0, 0.5 (12x20)
        let sizes = [(2.0, (48, 80)), (1.0, (24, 40)), (0.5, (12, 20))];
        let outs: Vec<ScaleOutput> = sizes
            .iter()
            .enumerate()
            .map(|(i, &(scale, (h, w)))| ScaleOutput {
                scale,
                size: (h, w),
                cls: rnd(3, h / 4, w / 4, i as u64),
                aux: rnd(3, h / 4, w / 4, 10 + i as u64),
                attn: (scale < 2.0)
                    .then(|| (rnd(1, h, w, 20 + i as u64) * 0.2).unwrap() + 0.5)
                    .transpose()
                    .unwrap(),
                feats: konst(0.0, 1, 1, 1),
            })
            .collect();
        let (a1, a05) = (outs[1].attn.clone().unwrap(), outs[2].attn.clone().unwrap());
        let max_diff = |a: &Tensor, b: Tensor| -> f64 {
            let d = (a - b).unwrap().abs().unwrap();
            d.max_all().unwrap().to_scalar::<f64>().unwrap()
        };
        // the recurrence with candle's own broadcast arithmetic, on the
        // logits (`aux = false`) or the aux logits
        let one_minus = |a: &Tensor| a.affine(-1.0, 1.0).unwrap();
        let up = |o: &ScaleOutput, aux: bool| {
            let t = if aux { &o.aux } else { &o.cls };
            resize(t, o.size.0, o.size.1).unwrap()
        };
        let recurrence = |aux: bool| {
            let (l2, l1, l05) = (up(&outs[0], aux), up(&outs[1], aux), up(&outs[2], aux));
            let low2 = resize(&l2, 24, 40).unwrap();
            let p = (l1.broadcast_mul(&a1).unwrap() + low2.broadcast_mul(&one_minus(&a1)).unwrap()).unwrap();
            let lo = resize(&l05.broadcast_mul(&a05).unwrap(), 24, 40).unwrap();
            let up_a = resize(&a05, 24, 40).unwrap();
            (lo + p.broadcast_mul(&one_minus(&up_a)).unwrap()).unwrap()
        };
        let f = Fusion::Hierarchical.fuse(&outs, (24, 40), None, false).unwrap();
        let d = max_diff(&f.pred, recurrence(false));
        assert!(d < 1e-12, "hierarchical: {d}");
        // in training the aux logits, through the same composed resizes
        let f = Fusion::Hierarchical.fuse(&outs, (24, 40), None, true).unwrap();
        let d = max_diff(f.aux.as_ref().unwrap(), recurrence(true));
        assert!(d < 1e-12, "hierarchical aux: {d}");
        let (l2, l1, l05) = (up(&outs[0], false), up(&outs[1], false), up(&outs[2], false));
        // averaging: mean of the softmaxes of every scale brought to 24x40
        let sm = |t: &Tensor| candle_nn::ops::softmax(t, 1).unwrap();
        let mean = ((sm(&resize(&l2, 24, 40).unwrap()) + sm(&l1)).unwrap()
            + sm(&resize(&l05, 24, 40).unwrap()))
        .unwrap();
        let want = (mean / 3.0).unwrap().log().unwrap();
        let got = Fusion::Average.fuse(&outs, (24, 40), None, false).unwrap().pred;
        let d = max_diff(&got, want);
        assert!(d < 1e-12, "average: {d}");
    }

    #[test]
    fn average_and_max_of_probabilities_by_hand() {
        let l3 = 3f64.ln();
        let one = Tensor::from_slice(&[0.0, l3], (1, 2, 1, 1), &Device::Cpu).unwrap();
        let half = Tensor::from_slice(&[l3, 0.0], (1, 2, 1, 1), &Device::Cpu).unwrap();
        let outs = [out(1.0, one, None), out(0.5, half, None)];
        // softmaxes [0.25, 0.75] and [0.75, 0.25]
        let avg = vals(&Fusion::Average.fuse(&outs, (1, 1), None, false).unwrap().pred);
        let max = vals(&Fusion::Max.fuse(&outs, (1, 1), None, false).unwrap().pred);
        for v in avg {
            assert!((v - 0.5f64.ln()).abs() < 1e-12);
        }
        for v in max {
            assert!((v - 0.75f64.ln()).abs() < 1e-12);
        }
    }

    #[test]
    fn single_resizes_to_the_output() {
        let outs = [out(0.5, logits(&[1., 3.], 1, 2), None)];
        let f = Fusion::Single.fuse(&outs, (2, 4), None, false).unwrap();
        // 2 -> 4 along the width: 1, 1.5, 2.5, 3 (rows repeat)
        check(&f, &[1.0, 1.5, 2.5, 3.0, 1.0, 1.5, 2.5, 3.0]);
    }

    #[test]
    fn flip_average_by_hand() {
        let a = Tensor::from_slice(&[0.0f64, 0.0], (1, 2, 1, 1), &Device::Cpu).unwrap();
        let b = Tensor::from_slice(&[3f64.ln(), 0.0], (1, 2, 1, 1), &Device::Cpu).unwrap();
        let v = vals(&average_flip(&a, &b).unwrap());
        assert!((v[0] - 0.625f64.ln()).abs() < 1e-12);
        assert!((v[1] - 0.375f64.ln()).abs() < 1e-12);
    }

    #[test]
    fn scale_sets_are_checked() {
        let e = Fusion::Hierarchical
            .check_scales(&[0.5, 2.0], "eval.scales")
            .unwrap_err();
        assert!(
            e.to_string().contains("eval.scales") && e.to_string().contains("1.0"),
            "{e}"
        );
        assert!(Fusion::Single.check_scales(&[0.5, 1.0], "s").is_err());
        assert!(Fusion::Average.check_scales(&[1.0, 1.0], "s").is_err());
        assert!(Fusion::Average.check_scales(&[0.0], "s").is_err());
        assert!(Fusion::Average.check_scales(&[0.5, 2.0], "s").is_ok());
        assert_eq!("hierarchical".parse::<Fusion>().unwrap(), Fusion::Hierarchical);
        assert!("mean".parse::<Fusion>().is_err());
    }

    #[test]
    fn hierarchical_gradients_reach_both_scales_and_the_attention() {
        // P = up(a·L_lo) + (1 − up(a))·L_1, summed over a 2x2 map:
        // dΣP/dL_1 = 1 − a = 0.75 per pixel; dΣP/dL_lo = 4a = 1;
        // dΣP/da = 4·L_lo − ΣL_1 = 32 − 10 = 22 (one channel).
        let l1 = Var::from_tensor(&map(&[1., 2., 3., 4.], 2, 2)).unwrap();
        let lo = Var::from_tensor(&map(&[8.], 1, 1)).unwrap();
        let a = Var::from_tensor(&map(&[0.25], 1, 1)).unwrap();
        let outs = [
            out(1.0, l1.as_tensor().clone(), None),
            out(0.5, lo.as_tensor().clone(), Some(a.as_tensor().clone())),
        ];
        let f = Fusion::Hierarchical.fuse(&outs, (2, 2), None, true).unwrap();
        let g = f.pred.sum_all().unwrap().backward().unwrap();
        assert_eq!(vals(g.get(l1.as_tensor()).unwrap()), vec![0.75; 4]);
        assert!((vals(g.get(lo.as_tensor()).unwrap())[0] - 1.0).abs() < 1e-12);
        assert!((vals(g.get(a.as_tensor()).unwrap())[0] - 22.0).abs() < 1e-12);
    }
}
