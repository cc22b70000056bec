//! HRNetV2 backbone (Wang et al. 2019, arXiv 1908.07919) as the official
//! `network/hrnetv2.py` of NVIDIA/semantic-segmentation builds it.
//!
//! - Stem: two 3x3 stride-2 conv-BN-ReLU (1/4 resolution), then `layer1`
//!   (Bottleneck blocks).
//! - Stages 2–4 add one lower-resolution branch each (`transition1..3`); each
//!   stage repeats a high-resolution module: BasicBlocks per branch, then every
//!   branch fused into every other (`fuse_layers`: 1x1 conv + bilinear up, or
//!   chains of 3x3 stride-2 convs down). A stage may run no module
//!   (`modules = [1, 0, 0]`, the `small-short` preset): its transition still
//!   creates its branch, and the state_dict has no `stageN.*` entries.
//! - The four branch outputs are upsampled to 1/4 and concatenated
//!   (48+96+192+384 = 720 channels for W48).

use super::layers::{ConvBn, ConvBnConfig};
use candle_core::{ModuleT, Result, Tensor};
use candle_nn::VarBuilder;
use hmsa_kernels::resize::{resize, resize_as};
use serde::{Deserialize, Serialize};

/// Widths, block and module counts of the backbone.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackboneConfig {
    /// Output channels of the two stride-2 stem convolutions (64 officially).
    pub stem_width: usize,
    /// Bottleneck planes in `layer1`; its output is 4x this (64 -> 256).
    pub layer1_planes: usize,
    /// Bottleneck blocks in `layer1` (4).
    pub layer1_blocks: usize,
    /// Branch widths; stage 2 uses the first two, stage 3 three, stage 4 all.
    pub widths: [usize; 4],
    /// High-resolution modules in stages 2, 3, 4 (1, 4, 3); 0 leaves a
    /// stage with its transition only.
    pub modules: [usize; 3],
    /// BasicBlocks per branch in stages 2, 3, 4 (4, 4, 4).
    pub blocks: [usize; 3],
}

impl BackboneConfig {
    /// Channels of the concatenated 1/4-resolution output.
    pub fn out_channels(&self) -> usize {
        self.widths.iter().sum()
    }
}

#[derive(Debug, Clone)]
struct BasicBlock {
    cb1: ConvBn,
    cb2: ConvBn,
}

impl BasicBlock {
    fn new(c: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            cb1: ConvBn::new(
                c,
                c,
                ConvBnConfig {
                    conv_at: "conv1",
                    bn_at: "bn1",
                    ..Default::default()
                },
                vb.clone(),
            )?,
            cb2: ConvBn::new(
                c,
                c,
                ConvBnConfig {
                    relu: false,
                    conv_at: "conv2",
                    bn_at: "bn2",
                    ..Default::default()
                },
                vb,
            )?,
        })
    }
}

impl ModuleT for BasicBlock {
    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        self.cb2
            .forward_residual(&self.cb1.forward_t(x, train)?, x, train)
    }
}

#[derive(Debug, Clone)]
struct Bottleneck {
    cb1: ConvBn,
    cb2: ConvBn,
    cb3: ConvBn,
    downsample: Option<ConvBn>,
}

impl Bottleneck {
    const EXPANSION: usize = 4;

    fn new(cin: usize, planes: usize, vb: VarBuilder) -> Result<Self> {
        let cout = planes * Self::EXPANSION;
        // Creation order is PyTorch's listing order (conv1, bn1, conv2, ...).
        Ok(Self {
            cb1: ConvBn::new(
                cin,
                planes,
                ConvBnConfig {
                    k: 1,
                    conv_at: "conv1",
                    bn_at: "bn1",
                    ..Default::default()
                },
                vb.clone(),
            )?,
            cb2: ConvBn::new(
                planes,
                planes,
                ConvBnConfig {
                    conv_at: "conv2",
                    bn_at: "bn2",
                    ..Default::default()
                },
                vb.clone(),
            )?,
            cb3: ConvBn::new(
                planes,
                cout,
                ConvBnConfig {
                    k: 1,
                    relu: false,
                    conv_at: "conv3",
                    bn_at: "bn3",
                    ..Default::default()
                },
                vb.clone(),
            )?,
            downsample: if cin != cout {
                Some(ConvBn::new(
                    cin,
                    cout,
                    ConvBnConfig {
                        k: 1,
                        relu: false,
                        ..Default::default()
                    },
                    vb.pp("downsample"),
                )?)
            } else {
                None
            },
        })
    }
}

impl ModuleT for Bottleneck {
    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let y = self.cb1.forward_t(x, train)?;
        let y = self.cb2.forward_t(&y, train)?;
        let skip = match &self.downsample {
            Some(d) => d.forward_t(x, train)?,
            None => x.clone(),
        };
        self.cb3.forward_residual(&y, &skip, train)
    }
}

/// How branch `j` reaches branch `i` inside a fuse layer.
#[derive(Debug, Clone)]
enum FuseOp {
    Identity,
    /// j > i: 1x1 conv + BN to branch i's width, then bilinear up.
    Up(ConvBn),
    /// j < i: (i - j) 3x3 stride-2 conv-BN, ReLU on all but the last.
    Down(Vec<ConvBn>),
}

/// One HighResolutionModule: per-branch BasicBlocks, then the exchange.
#[derive(Debug, Clone)]
struct HrModule {
    branches: Vec<Vec<BasicBlock>>,
    fuse: Vec<Vec<FuseOp>>,
}

impl HrModule {
    fn new(widths: &[usize], blocks: usize, vb: VarBuilder) -> Result<Self> {
        let nb = widths.len();
        let mut branches = Vec::with_capacity(nb);
        for (b, &w) in widths.iter().enumerate() {
            let vbb = vb.pp("branches").pp(b);
            branches.push(
                (0..blocks)
                    .map(|k| BasicBlock::new(w, vbb.pp(k)))
                    .collect::<Result<Vec<_>>>()?,
            );
        }
        let mut fuse = Vec::with_capacity(nb);
        if nb > 1 {
            for i in 0..nb {
                let mut row = Vec::with_capacity(nb);
                for j in 0..nb {
                    let vij = vb.pp("fuse_layers").pp(i).pp(j);
                    row.push(match j.cmp(&i) {
                        std::cmp::Ordering::Greater => FuseOp::Up(ConvBn::new(
                            widths[j],
                            widths[i],
                            ConvBnConfig {
                                k: 1,
                                relu: false,
                                ..Default::default()
                            },
                            vij,
                        )?),
                        std::cmp::Ordering::Equal => FuseOp::Identity,
                        std::cmp::Ordering::Less => {
                            let steps = i - j;
                            let mut chain = Vec::with_capacity(steps);
                            for k in 0..steps {
                                let last = k + 1 == steps;
                                let cout = if last { widths[i] } else { widths[j] };
                                chain.push(ConvBn::new(
                                    widths[j],
                                    cout,
                                    ConvBnConfig {
                                        stride: 2,
                                        relu: !last,
                                        ..Default::default()
                                    },
                                    vij.pp(k),
                                )?);
                            }
                            FuseOp::Down(chain)
                        }
                    });
                }
                fuse.push(row);
            }
        }
        Ok(Self { branches, fuse })
    }

    fn forward_t(&self, xs: &[Tensor], train: bool) -> Result<Vec<Tensor>> {
        let mut ys = Vec::with_capacity(xs.len());
        for (x, blocks) in xs.iter().zip(&self.branches) {
            let mut y = x.clone();
            for b in blocks {
                y = b.forward_t(&y, train)?;
            }
            ys.push(y);
        }
        if self.fuse.is_empty() {
            return Ok(ys);
        }
        let mut out = Vec::with_capacity(ys.len());
        for (i, row) in self.fuse.iter().enumerate() {
            let mut acc: Option<Tensor> = None;
            for (j, op) in row.iter().enumerate() {
                let term = match op {
                    FuseOp::Identity => ys[j].clone(),
                    FuseOp::Up(cb) => resize_as(&cb.forward_t(&ys[j], train)?, &ys[i])?,
                    FuseOp::Down(chain) => {
                        let mut t = ys[j].clone();
                        for cb in chain {
                            t = cb.forward_t(&t, train)?;
                        }
                        t
                    }
                };
                acc = Some(match acc {
                    None => term,
                    Some(a) => (a + term)?,
                });
            }
            out.push(acc.expect("at least one branch").relu()?);
        }
        Ok(out)
    }
}

/// `transition{k}`: adapts the previous stage's branches to the next stage's.
#[derive(Debug, Clone)]
struct Transition {
    /// Per new-stage branch: None = pass through, else a conv chain.
    layers: Vec<Option<Vec<ConvBn>>>,
}

impl Transition {
    fn new(pre: &[usize], cur: &[usize], vb: VarBuilder) -> Result<Self> {
        let mut layers = Vec::with_capacity(cur.len());
        for (i, &c) in cur.iter().enumerate() {
            if i < pre.len() {
                layers.push(if pre[i] != c {
                    Some(vec![ConvBn::new(pre[i], c, ConvBnConfig::default(), vb.pp(i))?])
                } else {
                    None
                });
            } else {
                // New branch: stride-2 convs from the lowest existing resolution.
                let cin = *pre.last().expect("non-empty");
                let steps = i + 1 - pre.len();
                let mut chain = Vec::with_capacity(steps);
                for j in 0..steps {
                    let cout = if j + 1 == steps { c } else { cin };
                    chain.push(ConvBn::new(
                        cin,
                        cout,
                        ConvBnConfig {
                            stride: 2,
                            ..Default::default()
                        },
                        vb.pp(i).pp(j),
                    )?);
                }
                layers.push(Some(chain));
            }
        }
        Ok(Self { layers })
    }

    fn forward_t(&self, ys: &[Tensor], train: bool) -> Result<Vec<Tensor>> {
        let mut out = Vec::with_capacity(self.layers.len());
        for (i, layer) in self.layers.iter().enumerate() {
            let src = if i < ys.len() { &ys[i] } else { &ys[ys.len() - 1] };
            out.push(match layer {
                None => src.clone(),
                Some(chain) => {
                    let mut t = src.clone();
                    for cb in chain {
                        t = cb.forward_t(&t, train)?;
                    }
                    t
                }
            });
        }
        Ok(out)
    }
}

/// The HRNetV2 trunk; `forward_t` gives the concatenated 1/4-resolution map.
#[derive(Debug, Clone)]
pub struct HrnetV2 {
    stem: [ConvBn; 2],
    layer1: Vec<Bottleneck>,
    transitions: Vec<Transition>,
    stages: Vec<Vec<HrModule>>,
}

impl HrnetV2 {
    pub fn new(cfg: &BackboneConfig, vb: VarBuilder) -> Result<Self> {
        let s = cfg.stem_width;
        let stem = [
            ConvBn::new(
                3,
                s,
                ConvBnConfig {
                    stride: 2,
                    conv_at: "conv1",
                    bn_at: "bn1",
                    ..Default::default()
                },
                vb.clone(),
            )?,
            ConvBn::new(
                s,
                s,
                ConvBnConfig {
                    stride: 2,
                    conv_at: "conv2",
                    bn_at: "bn2",
                    ..Default::default()
                },
                vb.clone(),
            )?,
        ];
        let mut cin = s;
        let mut layer1 = Vec::with_capacity(cfg.layer1_blocks);
        for k in 0..cfg.layer1_blocks {
            layer1.push(Bottleneck::new(cin, cfg.layer1_planes, vb.pp("layer1").pp(k))?);
            cin = cfg.layer1_planes * Bottleneck::EXPANSION;
        }
        let mut pre = vec![cin];
        let mut transitions = Vec::with_capacity(3);
        let mut stages = Vec::with_capacity(3);
        for st in 0..3 {
            let cur = &cfg.widths[..st + 2];
            transitions.push(Transition::new(
                &pre,
                cur,
                vb.pp(format!("transition{}", st + 1)),
            )?);
            let vs = vb.pp(format!("stage{}", st + 2));
            stages.push(
                (0..cfg.modules[st])
                    .map(|m| HrModule::new(cur, cfg.blocks[st], vs.pp(m)))
                    .collect::<Result<Vec<_>>>()?,
            );
            pre = cur.to_vec();
        }
        Ok(Self {
            stem,
            layer1,
            transitions,
            stages,
        })
    }
}

impl ModuleT for HrnetV2 {
    /// (N, 3, H, W) -> (N, ΣC, ⌈⌈H/2⌉/2⌉, ⌈⌈W/2⌉/2⌉)
    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let mut y = self.stem[0].forward_t(x, train)?;
        y = self.stem[1].forward_t(&y, train)?;
        for b in &self.layer1 {
            y = b.forward_t(&y, train)?;
        }
        let mut ys = vec![y];
        for (t, stage) in self.transitions.iter().zip(&self.stages) {
            ys = t.forward_t(&ys, train)?;
            for m in stage {
                ys = m.forward_t(&ys, train)?;
            }
        }
        let (_, _, h, w) = ys[0].dims4()?;
        let parts = ys.iter().map(|t| resize(t, h, w)).collect::<Result<Vec<_>>>()?;
        Tensor::cat(&parts, 1)
    }
}
