//! One training step's graph, cut where each scale's network hands its
//! outputs to the fusion and the loss, so that the backward runs in two
//! stages: the fusion's and the loss's part first (down to the cut), then
//! every scale's network at once (rayon), their parameter gradients summed.
//!
//! candle's backward walks one graph node by node, and the 0.5x pass of
//! hierarchical training is a chain of small maps that two cores share
//! badly; run beside the 1.0x pass, it fills the cores the larger pass
//! leaves idle. The gradients are the same sums in another order (rounding
//! aside). On other devices, and with one scale, the graph stays whole.

use crate::model::fusion::{Fused, Fusion, ScaleOutput};
use crate::model::HmsaNet;
use crate::Result;
use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};
use rayon::prelude::*;

/// A training forward: the fused prediction, the per-scale outputs as the
/// fusion and the loss read them, and the networks' own outputs.
pub struct StepForward {
    pub fused: Fused,
    /// What the loss reads per scale: leaf variables cut from the networks'
    /// outputs when the graph is cut, else those outputs themselves.
    pub outs: Vec<ScaleOutput>,
    /// The networks' outputs, with their graphs, when the graph is cut.
    nets: Option<Vec<ScaleOutput>>,
}

/// The training forward of `net` on `x` at `scales`, fused by `fusion`.
pub fn forward(net: &HmsaNet, x: &Tensor, fusion: Fusion, scales: &[f64]) -> Result<StepForward> {
    crate::on_pool(x.device(), || {
        fusion.check_scales(scales, "scales")?;
        let (_, _, h, w) = x.dims4()?;
        let nets = net.forward_scales(x, scales, fusion.needs_relative_attention(), true)?;
        let split = nets.len() > 1 && x.device().is_cpu();
        let outs = if split {
            nets.iter()
                .map(|o| cut(o, fusion == Fusion::Explicit))
                .collect::<Result<_>>()?
        } else {
            nets.clone()
        };
        let fused = net.fuse(fusion, &outs, (h, w), true)?;
        Ok(StepForward {
            fused,
            outs,
            nets: split.then_some(nets),
        })
    })
}

/// `o`'s tensors as leaf variables (copies), the OCR features too where
/// the fusion reads them (explicit attention), else detached.
fn cut(o: &ScaleOutput, feats: bool) -> Result<ScaleOutput> {
    // (a network output is never a variable, so `from_tensor` copies it)
    let leaf = |t: &Tensor| -> Result<Tensor> { Ok(Var::from_tensor(t)?.as_tensor().clone()) };
    Ok(ScaleOutput {
        scale: o.scale,
        size: o.size,
        cls: leaf(&o.cls)?,
        aux: leaf(&o.aux)?,
        attn: o.attn.as_ref().map(leaf).transpose()?,
        feats: if feats { leaf(&o.feats)? } else { o.feats.detach() },
    })
}

fn tensors(o: &ScaleOutput) -> [Option<&Tensor>; 4] {
    [Some(&o.cls), Some(&o.aux), o.attn.as_ref(), Some(&o.feats)]
}

impl StepForward {
    /// The gradients of `total` (a loss over [`Self::fused`] and
    /// [`Self::outs`]) with respect to every variable.
    pub fn backward(&self, total: &Tensor) -> Result<GradStore> {
        let mut grads = total.backward()?;
        let Some(nets) = &self.nets else {
            return Ok(grads);
        };
        let head = &grads;
        let stores = crate::on_pool(total.device(), || {
            if hmsa_kernels::profile::enabled() {
                // one after the other, so that a profile's op times add up
                nets.iter()
                    .zip(&self.outs)
                    .map(|(net, cut)| net_backward(net, cut, head))
                    .collect::<Result<Vec<_>>>()
            } else {
                nets.par_iter()
                    .zip(&self.outs)
                    .map(|(net, cut)| net_backward(net, cut, head))
                    .collect::<Result<Vec<_>>>()
            }
        })?;
        for s in stores.into_iter().flatten() {
            grads.extend(s)?;
        }
        Ok(grads)
    }
}

/// The backward of one scale's network from the gradients `head` holds for
/// its cut outputs: `Σ_t sum(t·∂t)` has exactly those gradients at the
/// outputs `t`. `None` when nothing read them. (candle's product rule also
/// makes the gradient of each `∂t`, a map the size of the 1/4-resolution
/// logits, which is dropped with the store after the optimiser step.)
fn net_backward(net: &ScaleOutput, cut: &ScaleOutput, head: &GradStore) -> Result<Option<GradStore>> {
    let mut seed: Option<Tensor> = None;
    for (t, c) in tensors(net).into_iter().zip(tensors(cut)) {
        let (Some(t), Some(g)) = (t, c.and_then(|c| head.get(c))) else {
            continue;
        };
        let term = (t * g)?.sum_all()?;
        seed = Some(match seed {
            None => term,
            Some(s) => (s + term)?,
        });
    }
    Ok(seed.map(|s| s.backward()).transpose()?)
}
