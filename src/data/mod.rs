//! Data: the Cityscapes class table, reading images into normalised tensors
//! and writing label maps back as PNG.

pub mod cityscapes;
pub mod image;
