//! Evaluation: multi-scale inference over images and tensors, writing
//! predictions, attention maps and raw dumps.

pub mod infer;
